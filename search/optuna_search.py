"""`flextron search`: Optuna picks per-layer MLP widths, head counts and skipped layers under latency budgets.

The budget is a hard constraint applied through the latency model *before* any quality
evaluation: an infeasible trial is told to Optuna with its constraint violation (`set_constraint`,
or `constraints_func` on Optuna 4) and never costs a forward pass. Each study is seeded with
`enqueue_trial`: the quality model's knapsack picks under the budget (search/knapsack.py), the
trained router's answer and the largest fitting uniform configs; a proposal over budget is repaired
into one that fits, which is evaluated as a trial of its own. Studies live in an Optuna
storage (SQLite in the run by default, any database URL, or a journal file for many workers), so a
killed search resumes and several processes can share one study.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flextron.errors import FlextronError
from search.study import (
    config_params,
    ensure_study_attrs,
    open_storage,
    restart_studies,
    set_constraint,
    storage_id,
    study_progress,
    suggest_config,
    tpe_sampler,
    worker_id,
)
from search.trials import best_per_budget, collect_trials, pareto_front

INFEASIBLE_LOSS = 1e6  # told for trials never evaluated; with constraints they rank after every feasible one


@dataclass(frozen=True)
class SearchConfig:
    run: str  #: the run directory (profiled and fitted)
    regime: str = ""  #: a profiled regime (short form accepted); required when several were profiled
    budget_ms: tuple[float, ...] = ()  #: budgets in ms of per-step latency
    budget_frac: tuple[float, ...] = ()  #: budgets as fractions of the full model's measured latency (the profile's)
    quantile: str = "p50"  #: p50 | p90 | p99: the quantile of per-step latency a budget bounds
    #: distinct configs evaluated per budget (infeasible proposals and repeats are free and not counted)
    trials: int = 24
    frontier: bool = False  #: multi-objective search of latency and loss together (no budget)
    #: tpe (seeded with uniform and router configs) | random (plain random search, no seeds: the baseline)
    sampler: str = "tpe"
    #: the Optuna storage; empty: sqlite in RUN/search. A database URL or a *.log journal file lets
    #: workers share one study (each offsets its sampler seed by its process id)
    storage: str = ""
    study_prefix: str = ""  #: study name prefix; empty: device|regime|sampler|weights|quality setting
    eval_windows: int = 8  #: validation windows per config evaluated
    eval_seq_len: int = 128  #: tokens per validation window
    corpus: str = ""  #: validation text; empty: the corpus the run was converted with
    seed: int = 0  #: sampler seed
    device: str = "auto"  #: where quality is evaluated: cpu, cuda, cuda:N, or auto (CUDA when present)
    #: the precision configs are evaluated in: float32 | bfloat16 | auto (this search's kept results', else
    #: bfloat16 where the device computes it natively: flextron.devices.resolve_eval_dtype); saved resolved, and
    #: part of the quality setting
    eval_dtype: str = "auto"
    skip_infeasible: bool = False  #: drop budgets below the smallest sub-network instead of failing
    weights: str = "auto"  #: elastic (one-shot) | trained | auto (trained when `flextron train` made it)
    restart: bool = False  #: remove this regime's and weights' search results and studies, then search anew
    #: aim this share below each budget; -1: the latency model's own held-out uncertainty
    margin: float = -1.0
    #: seed each study with the quality model's knapsack picks and repair proposals over budget (the model is
    #: built by `flextron quality` when the run has none); false: TPE alone, over-budget proposals rejected
    quality_model: bool = True
    #: proposals asked per budget, at most, per config to evaluate (rejections cost milliseconds, but a budget
    #: almost nothing fits stops after --trials x this many asks and says so)
    max_asks_per_trial: int = 20
    nsga_population: int = 8  #: --frontier: NSGA-II's population size

    def __post_init__(self):
        from flextron.devices import check_eval_dtype, set_device_field
        from flextron.rundir import check_finite

        check_finite("trials", self.trials, low=1)
        check_finite("max_asks_per_trial", self.max_asks_per_trial, low=1, whole=True)
        check_finite("nsga_population", self.nsga_population, low=2, whole=True)
        check_finite("eval_windows", self.eval_windows, low=1)
        check_finite("eval_seq_len", self.eval_seq_len, low=2)
        if self.sampler not in ("tpe", "random"):
            raise FlextronError(f"--sampler must be tpe or random, got {self.sampler!r}")
        for b in self.budget_ms:
            check_finite("budget_ms", b, low=0, low_inclusive=False)
        for f in self.budget_frac:
            check_finite("budget_frac", f, low=0, low_inclusive=False, high=10)
        from flextron.budget import check_quantile

        check_quantile(self.quantile)
        if not self.frontier and not self.budget_ms and not self.budget_frac:
            raise FlextronError("give --budget-ms X or --budget-frac F (repeatable), or --frontier")
        set_device_field(self)
        check_eval_dtype(self.eval_dtype)
        check_finite("margin", self.margin, low=-1, high=0.5)
        if -1 < self.margin < 0:
            raise FlextronError(f"--margin must be -1 (auto) or in [0, 0.5], got {self.margin}")


def search_margin(run_root: Path, regime_key: str) -> float:
    """How far below a budget the search aims so its picks hold when measured: the latency model's
    held-out error or the profile's noise floor (of ratios), whichever is larger, capped at 10%. A
    pick predicted right at its budget is a coin toss on a machine with a 1% noise floor."""
    from profiler.latency_model import LatencyModels

    m = LatencyModels.read_metrics(run_root).get(regime_key, {})
    pct = max(m.get("heldout", {}).get("mape_pct") or 0.0, m.get("ratio_noise_floor_pct") or 0.0)
    return min(0.10, pct / 100)


def results_dir(run_root: str | Path, regime_key: str, weights: str) -> Path:
    """Where one regime's search results for one set of weights live: they never share files."""
    from flextron.rundir import safe_name
    from flextron.spec import regime_slug

    return Path(run_root) / "search" / regime_slug(regime_key) / safe_name(weights)


def feasible_range(lat_model, spec) -> tuple[float, float]:
    """The least and greatest predicted latency over every config of `spec` (not the narrowest
    and the full config: on a noisy profile a wider choice can be predicted faster)."""
    lo, hi = lat_model.range_ms(spec)
    return float(lo), float(hi)


def search_budget(
    study_name,
    storage,
    spec,
    lat_model,
    evaluator,
    budget,
    cfg: SearchConfig,
    progress=None,
    routers=None,
    attrs: dict | None = None,
    tail: float = 1.0,
    margin: float = 0.0,
    floor_ms: float = 0.0,
    tables=None,
) -> dict:
    """Run one budget's study until it holds `cfg.trials` distinct evaluated (feasible) configs.

    `budget` is a resolved Budget's dict; `tail` the regime's quantile-over-median factor (see
    `Profile.tail_factor`), so a proposal fits when its predicted median x tail is within budget_ms.
    `tables` (search/knapsack.py LayerTables: the latency and quality models' per-layer terms), when
    given, seed the study with the knapsack's best configs under the budget (every space's picks) and
    repair every proposal the latency model puts over budget: the repaired config is
    evaluated and added to the study as its own trial, the proposal is told as infeasible, so no
    proposal that does not fit is ever evaluated and none is wasted. With a `margin`, the joint and depth-path
    picks at the budget itself and halfway down to the margin are seeded first ("knapsack_stretch*",
    "knapsack_stretch_half*"): predicted within it but not `margin` below it, they are what verify measures
    first, so a pick does not leave the margin unused where it measures within (verify falls back to the next
    best where it does not); then the margin's, then those one margin below the margin ("knapsack_deep*",
    this budget's candidates for a verify session that measures slower than the profile), then the other
    spaces' (`search.knapsack.budget_seeds`). Without `tables` an over-budget
    proposal is told as a constraint violation and never evaluated. A repeat of a config already
    evaluated is told its cached loss and not counted; a config another worker is evaluating right
    now is skipped (told as failed). Returns what happened, including why it stopped."""
    import optuna

    from profiler.latency_model import encode
    from search.knapsack import budget_seeds, distinct, repair

    # on the median scale the latency model predicts, `margin` below the budget (never below the fastest config)
    budget_ms = max(budget["budget_ms"] / tail * (1 - margin), floor_ms)
    raw_ms = budget["budget_ms"] / tail  # the budget itself on the median scale
    depth = tables is not None and tables.skip_ms is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = cfg.seed if not cfg.storage else cfg.seed * 1_000_003 + os.getpid()
    random_sampler = optuna.samplers.RandomSampler(seed=seed)
    sampler = tpe_sampler(seed, 0) if cfg.sampler == "tpe" else random_sampler
    # TPE's start-up phase counts *evaluated* trials: infeasible proposals carry no quality signal,
    # so random proposals continue until a few feasible configs were evaluated (or asks run long).
    # The knapsack's seeds are evaluated trials too: with them TPE starts at once.
    n_startup = max(2, cfg.trials // 3)
    study = optuna.create_study(
        study_name=study_name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
    )
    ensure_study_attrs(study, {**(attrs or {}), **budget})
    n_seeded = 0
    if not study.trials and cfg.sampler == "tpe":  # "random" is the plain baseline: no seeds
        # Seeds: the knapsack's picks (the quality model's best guesses under the budget; sparse ones that
        # concentrate width cuts in few layers; depth- and width-only ones), the router's answer, and the
        # largest fitting uniform config, the baseline the search must beat anyway. With a margin, the
        # joint and depth-path picks of four rungs go first (`budget_seeds`): at the budget itself
        # ("knapsack_stretch*"), halfway down to the margin ("knapsack_stretch_half*"), at the margin, and
        # a margin further down ("knapsack_deep*"), then the other spaces' picks: verify tries the candidates
        # in loss order and falls back to the lower rungs only where the upper ones measure over, so the
        # budget is used, and a verify session that measures slower than the profile did still finds this
        # budget's candidate. Real evaluations arbitrate between the spaces; TPE proposes the rest.
        # Workers starting together may both seed: the repeat is then told its cached loss, not re-evaluated.
        queue = []
        if tables is not None:
            queue += budget_seeds(tables, raw_ms, budget_ms, max(1, cfg.trials // 4), floor_ms)
        if routers is not None:  # the trained static router's answer for this budget goes first
            queue.insert(0, ("router", routers.config_for(budget_ms, lat_model.predict_config)))
        uniform = spec.uniform_configs()
        preds = lat_model.predict(encode(uniform))
        fitting = sorted(((p, s) for p, s in zip(preds, uniform) if p <= budget_ms), key=lambda ps: -ps[0])
        queue = distinct(queue)[: cfg.trials - 1 if fitting else cfg.trials]
        queue = distinct(queue + [("uniform", c) for _, c in fitting[: max(1, min(2, cfg.trials // 4))]])
        queue = queue[: cfg.trials]
        for source, seed_cfg in queue:
            study.enqueue_trial(config_params(seed_cfg, spec, depth), user_attrs={"source": source},
                                skip_if_exists=True)
        n_seeded = len(queue)
    if tables is not None:
        n_startup = min(n_startup, n_seeded) if n_seeded else n_startup

    asked, repeats, repaired, stop = 0, 0, 0, "done"
    bar = progress(total=cfg.trials, desc=f"search {budget['budget_ms']:.3g} ms") if progress else None
    max_asks = cfg.max_asks_per_trial * cfg.trials  # tight budgets reject many proposals; cheap, but capped
    while True:
        evaluated, claims = study_progress(study)
        if bar:
            bar.n = min(len(evaluated), cfg.trials)
            bar.refresh()
        if len(evaluated) >= cfg.trials:
            break
        if len(evaluated) + len({c[2] for c in claims}) >= cfg.trials:
            stop = "the remaining evaluations are in progress in other workers"
            break
        if asked >= max_asks:
            stop = (
                f"ran out of proposals: {asked} asked, {len(evaluated)} of {cfg.trials} distinct feasible configs found"
            )
            break
        if cfg.sampler == "tpe":
            study.sampler = random_sampler if len(evaluated) < n_startup and asked < 4 * cfg.trials else sampler
        trial = study.ask()
        asked += 1
        proposed = suggest_config(trial, spec, depth)
        pred = lat_model.predict_config(proposed)
        trial.set_user_attr("predicted_latency_ms", pred)
        trial.set_user_attr("config", proposed.to_json())
        set_constraint(trial, [pred - budget_ms])
        sub = proposed
        limit = raw_ms if str(trial.user_attrs.get("source", "")).startswith("knapsack_stretch") else budget_ms
        if pred > limit:
            sub = repair(tables, proposed, budget_ms, lat_model.predict_config) if tables is not None else None
            if sub is None:
                trial.set_user_attr("evaluated", False)
                study.tell(trial, INFEASIBLE_LOSS)
                continue
        key = sub.to_json()
        if key not in evaluated:
            # Claim the evaluation (write), then look (read) and step back on any other live claim for
            # the same config or for the last slots. Of two workers that both wrote before reading, at least
            # the later reader sees the other's claim, so two never both go ahead (no overshoot); both
            # may step back, and the one that tells its step-back last finds the slot free again.
            trial.set_user_attr("config", key)  # what this trial is evaluating, for the claims
            trial.set_user_attr("claimed_at", time.time())
            trial.set_user_attr("claimed_by", worker_id())
            evaluated, claims = study_progress(study)
            others = [c for c in claims if c[1] != trial.number]
            if key not in evaluated and (
                any(c[2] == key for c in others) or len(evaluated) + len({c[2] for c in others}) >= cfg.trials
            ):
                trial.set_user_attr("config", proposed.to_json())
                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # another worker has it
                time.sleep(random.uniform(0.0, 0.05))  # de-synchronise workers that stepped back together
                continue
        is_repeat = key in evaluated
        repeats += is_repeat
        try:
            loss = evaluator.loss(sub)
        except BaseException:  # Ctrl-C or an error: free the claim now, not after CLAIM_TTL_S
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if sub is proposed:
            trial.set_user_attr("repeat", is_repeat)
            trial.set_user_attr("evaluated", True)
            study.tell(trial, loss)
            continue
        # The repaired config is a trial of its own (its params, its loss, within budget); the
        # proposal stays an infeasible trial, so TPE learns where the budget ends as well.
        repaired += 1
        sub_pred = lat_model.predict_config(sub)
        study.add_trial(optuna.trial.create_trial(
            params=config_params(sub, spec, depth), distributions=trial.distributions, value=loss,
            user_attrs={"config": key, "predicted_latency_ms": sub_pred, "evaluated": True, "repeat": is_repeat,
                        "source": "repair", "constraint": [sub_pred - budget_ms]},
            constraints={"latency_over_budget_ms_0": sub_pred - budget_ms}))
        trial.set_user_attr("config", proposed.to_json())
        trial.set_user_attr("repaired_to", key)
        trial.set_user_attr("evaluated", False)
        study.tell(trial, INFEASIBLE_LOSS)
    if bar:
        bar.close()
    return {
        "study": study_name,
        **budget,
        "evaluated": len(evaluated),
        "asked_here": asked,
        "repeats_here": repeats,
        "repaired_here": repaired,
        "seeded": n_seeded,
        "stop": stop,
    }


def search_frontier(
    study_name, storage, spec, lat_model, evaluator, cfg: SearchConfig, attrs: dict | None = None
) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.nsga_population),
        load_if_exists=True,
    )
    ensure_study_attrs(study, attrs or {})
    if not study.trials:
        for f in (1.0, 0.75, 0.5, 0.25):
            study.enqueue_trial(config_params(spec.uniform(f), spec), skip_if_exists=True)
    while len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) < cfg.trials:
        trial = study.ask()
        sub = suggest_config(trial, spec)
        pred = lat_model.predict_config(sub)
        trial.set_user_attr("predicted_latency_ms", pred)
        trial.set_user_attr("config", sub.to_json())
        trial.set_user_attr("evaluated", True)
        study.tell(trial, [pred, evaluator.loss(sub)])
    return {"study": study_name, "pareto_size": len(study.best_trials)}


def search(cfg: SearchConfig) -> dict:
    import sys

    import pandas as pd

    from flextron.budget import Budget
    from flextron.devices import check_device, resolve_eval_dtype
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.router_store import Routers, regime_dir
    from flextron.rundir import (
        RunDir,
        read_json,
        read_parquet,
        rebuild,
        save_stage_config,
        write_json_atomic,
        write_parquet_atomic,
    )
    from profiler.latency_model import LatencyModels
    from profiler.profile import Profile
    from search.quality import QUALITY_CACHE, QualityEvaluator

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)  # first: a run with no model names `flextron convert`
    check_device(cfg.device)
    models = LatencyModels.load(run.root)
    regime_key = models.resolve(cfg.regime)
    lat_model = models.get(regime_key)
    storage = open_storage(cfg, run.root)
    out = results_dir(run.root, regime_key, wname)
    dtype = resolve_eval_dtype(cfg.eval_dtype, cfg.device, None if cfg.restart else out / "search_config.json")
    elastic = ElasticModel.load(wdir, device=cfg.device, dtype=dtype)
    elastic.check_positions(cfg.eval_seq_len, "--eval-seq-len")
    spec = elastic.spec
    lo, hi = feasible_range(lat_model, spec)
    corpus = run.corpus(cfg.corpus)
    cfg = replace(cfg, corpus=corpus, eval_dtype=dtype)  # saved as resolved: an absolute path, or wiki / pydoc
    wtag = run.weights_tag(wname)
    evaluator = QualityEvaluator(
        elastic, run / "search" / QUALITY_CACHE, cfg.eval_windows, cfg.eval_seq_len, corpus=corpus, tag=wtag
    )
    prefix = cfg.study_prefix or f"{models.device_name}|{regime_key}|{cfg.sampler}|{wname}|{evaluator.setting}"
    routers = None
    router_dir = regime_dir(run.root, regime_key, weights=wname)
    if (router_dir / "router.json").is_file():
        routers = Routers.load(run.root, regime_key, spec, weights=wname)
        if routers.meta.get("weights_tag") != wtag:  # trained on an earlier training run's weights
            print(
                f"flextron search: not seeding with the routers in {router_dir}: they were trained on other "
                f"{wname} weights; re-run `flextron route`",
                file=sys.stderr,
            )
            routers = None

    # Every budget is resolved against one reference: the full model measured in the profile.
    profile = Profile.load(run.root)
    full_ms = profile.full_ms(regime_key, spec)
    tail = profile.tail_factor(regime_key, cfg.quantile)
    lo, hi = lo * tail, hi * tail  # the feasible range at this quantile
    budgets = [Budget(regime_key, budget_ms=b, quantile=cfg.quantile).resolve(full_ms).to_dict() for b in cfg.budget_ms]
    budgets += [
        Budget(regime_key, budget_frac=f, quantile=cfg.quantile).resolve(full_ms).to_dict() for f in cfg.budget_frac
    ]
    if cfg.skip_infeasible:
        for b in [b for b in budgets if b["budget_ms"] < lo]:
            print(
                f"flextron search: skipping budget {b['budget_ms']:.4g} ms, below the fastest sub-network "
                f"({lo:.4g} ms predicted)",
                file=sys.stderr,
            )
        budgets = [b for b in budgets if b["budget_ms"] >= lo]
        if not budgets and not cfg.frontier:
            raise FlextronError(
                f"every budget is below the fastest sub-network ({lo:.4g} ms predicted for {regime_key}); "
                f"feasible budgets run from {lo:.4g} to {hi:.4g} ms"
            )
    for b in budgets:
        if b["budget_ms"] < lo:
            raise FlextronError(
                f"budget {b['budget_ms']:.4g} ms is below the fastest sub-network ({lo:.4g} ms predicted at "
                f"{cfg.quantile} "
                f"for {regime_key} on {models.device_name}); feasible {cfg.quantile} budgets run from "
                f"{lo:.4g} to {hi:.4g} ms"
            )
    if cfg.restart:
        restart_studies(storage, out, prefix)
    best_path = out / "best.json"
    if best_path.is_file():
        prev = read_json(best_path, run.root)
        if prev.get("quality_setting") != evaluator.setting:
            raise FlextronError(
                f"{out} holds picks evaluated on {prev.get('quality_setting')!r}; this search evaluates on "
                f"{evaluator.setting!r} (--eval-windows, --eval-seq-len, --eval-dtype, --corpus, or re-trained "
                "weights). Their losses are not comparable: "
                "search with the same settings, or pass --restart to replace those results"
            )
    margin = search_margin(run.root, regime_key) if cfg.margin < 0 else cfg.margin
    tables, qmetrics = None, {}
    if cfg.quality_model and cfg.sampler == "tpe":
        tables, qmetrics = _layer_tables(run.root, wname, wtag, spec, lat_model, cfg)
    attrs = {
        "regime": regime_key,
        "device_name": models.device_name,
        "weights": wname,
        "quality_setting": evaluator.setting,
        # which proposals were feasible came from this model and margin: a resume under others would mix rules
        "latency_model_id": models.model_ids.get(regime_key),
        "search_margin": round(margin, 6),
    }
    t0 = time.perf_counter()
    results = []
    if cfg.frontier:
        frontier_attrs = {k: v for k, v in attrs.items() if k != "search_margin"}  # the frontier has no budget
        results.append(search_frontier(f"{prefix}|frontier", storage, spec, lat_model, evaluator, cfg, frontier_attrs))
    for b in sorted(budgets, key=lambda b: b["budget_ms"]):
        name = f"{prefix}|budget={b['budget_ms']:.6g}" + ("" if cfg.quantile == "p50" else f"@{cfg.quantile}")
        r = search_budget(
            name, storage, spec, lat_model, evaluator, b, cfg, progress, routers, attrs, tail, margin, lo / tail, tables
        )
        if r["stop"] != "done":
            print(f"flextron search: budget {b['budget_ms']:.4g} ms stopped early: {r['stop']}", file=sys.stderr)
        results.append(r)

    # Several workers may finish together: the results folder is read, merged and rebuilt aside in turns,
    # then swapped in whole (trials, front and picks of one merge; a kill leaves the previous version).
    with rebuild(out) as tmp:
        # This call's studies, plus what earlier searches of the same regime, weights and setting left in
        # other storages (a switch to a journal file must not drop earlier picks).
        sid = storage_id(cfg)
        trials = collect_trials(storage, prefix, sid)
        trials_path = out / "trials.parquet"
        if trials_path.is_file():
            old = read_parquet(trials_path, run.root)
            if "storage" in old.columns:
                fresh = set(zip(trials["storage"], trials["study"])) if len(trials) else set()
                old = old[[(s, st) not in fresh for s, st in zip(old["storage"], old["study"])]]
                trials = pd.concat(
                    [old.drop(columns=["regime", "device_name", "weights"], errors="ignore"), trials], ignore_index=True
                )
        trials = trials.assign(
            regime=regime_key, device_name=models.device_name, weights=wname
        )  # one folder: one of each
        write_parquet_atomic(trials, tmp / trials_path.name)
        if len(trials):
            write_parquet_atomic(pareto_front(trials), tmp / "pareto.parquet")
        best = best_per_budget(trials)
        write_json_atomic(
            tmp / best_path.name,
            {
                "regime": regime_key,
                "device_name": models.device_name,
                "weights": wname,
                "weights_tag": wtag,
                "quality_setting": evaluator.setting,
                "search_margin": margin,
                "best": best,
            },
        )
        save_stage_config(tmp / "search_config.json", cfg)
    by_budget = {(b["budget_ms"], b["quantile"]): b for b in best}
    return {
        "regime": regime_key,
        "weights": wname,
        "results": str(out),
        "budgets_ms": [b["budget_ms"] for b in budgets],
        "feasible_ms": [round(lo, 4), round(hi, 4)],
        "quality_evaluations": evaluator.evaluations,
        "evaluated_trials": int(trials["evaluated"].sum()) if len(trials) else 0,
        "infeasible_skipped": int((~trials["evaluated"]).sum()) if len(trials) else 0,
        "eval_tokens": evaluator.tokens,
        "reference_full_ms": full_ms,
        "quantile": cfg.quantile,
        "margin": round(margin, 4),
        "per_budget": [
            {k: r[k] for k in ("budget_ms", "budget_frac", "evaluated", "asked_here", "repeats_here", "repaired_here",
                               "seeded", "stop")}
            | (
                {
                    "ppl": round(math.exp(by_budget[(r["budget_ms"], r["quantile"])]["loss"]), 3),
                    "predicted_ms": round(by_budget[(r["budget_ms"], r["quantile"])]["predicted_latency_ms"], 4),
                }
                if (r.get("budget_ms"), r.get("quantile")) in by_budget
                else {}
            )
            for r in results
            if "budget_ms" in r
        ],
        "best": [
            {
                "budget_ms": b["budget_ms"],
                "ppl": round(math.exp(b["loss"]), 3),
                "predicted_ms": round(b["predicted_latency_ms"], 4),
            }
            for b in best
        ],
        "quality_model": None if tables is None else {
            "form": qmetrics.get("form"), "heldout_spearman": qmetrics.get("heldout", {}).get("spearman")},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _layer_tables(run_root: Path, wname: str, wtag: str, spec, lat_model, cfg: SearchConfig):
    """The knapsack's per-layer tables from the latency model and the run's quality model of these
    weights (built now, with its defaults, when there is none or it is stale)."""
    import sys

    from flextron.quality_model import quality_dir
    from flextron.rundir import file_lock
    from search.knapsack import LayerTables
    from search.quality_fit import QualityConfig, load_quality_model, quality

    try:
        qmodel, qmetrics = load_quality_model(run_root, wname, wtag, spec, cfg.corpus)
    except FlextronError as e:
        # Workers starting together build it once: the first builds, the others wait and load its model.
        folder = quality_dir(run_root, wname)
        with file_lock(folder.with_name(folder.name + ".build.lock")):
            try:
                qmodel, qmetrics = load_quality_model(run_root, wname, wtag, spec, cfg.corpus)
            except FlextronError:
                print(f"flextron search: {e}; building it now", file=sys.stderr)
                quality(QualityConfig(run=str(run_root), weights=wname, corpus=cfg.corpus, device=cfg.device,
                                      eval_dtype=cfg.eval_dtype))
                qmodel, qmetrics = load_quality_model(run_root, wname, wtag, spec, cfg.corpus)
    if not lat_model.depth:
        print("flextron search: the latency model has no depth (profiled before whole-layer cells): searching "
              "widths only; re-run `flextron profile --restart` and `flextron fit` to skip layers too", file=sys.stderr)
    return LayerTables.build(lat_model, qmodel, spec), qmetrics

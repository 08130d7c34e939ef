"""`flextron search`: Optuna picks per-layer MLP widths and head counts under latency budgets.

The budget is a hard constraint applied through the latency model *before* any quality
evaluation: an infeasible trial is told to Optuna with its constraint violation (`set_constraint`,
or `constraints_func` on Optuna 4) and never costs a forward pass. The largest fitting uniform
configs and the trained router's answer are seeded with `enqueue_trial`. Studies live in an Optuna storage (SQLite in the run by default, any database URL,
or a journal file for many workers), so a killed search resumes and several processes can share
one study.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

INFEASIBLE_LOSS = 1e6  # told for trials never evaluated; with constraints they rank after every feasible one
STORAGE_FILE = "optuna.db"


@dataclass(frozen=True)
class SearchConfig:
    run: str = "runs/demo"
    regime: str = ""  # a profiled regime (short form accepted); required when several were profiled
    budget_ms: tuple[float, ...] = ()
    budget_frac: tuple[float, ...] = ()  # budgets as fractions of the full model's measured latency
    trials: int = 24  # quality evaluations per budget (infeasible proposals are free and not counted)
    frontier: bool = False  # multi-objective search of latency and loss together (no budget)
    sampler: str = "tpe"  # tpe (seeded with uniform and router configs) | random (plain random search, no seeds: the baseline)
    storage: str = ""  # default: sqlite in RUN/search; or a database URL, or a *.log journal file
    study_prefix: str = ""
    eval_windows: int = 8
    eval_seq_len: int = 128
    seed: int = 0
    device: str = "cpu"
    skip_infeasible: bool = False  # drop budgets below the smallest sub-network instead of failing
    weights: str = "auto"  # elastic (one-shot) | trained | auto (trained when `flextron train` made it)

    def __post_init__(self):
        if self.trials < 1:
            raise FlextronError(f"--trials must be at least 1, got {self.trials}")
        if self.sampler not in ("tpe", "random"):
            raise FlextronError(f"--sampler must be tpe or random, got {self.sampler!r}")
        if any(b <= 0 for b in self.budget_ms) or any(not 0 < f <= 10 for f in self.budget_frac):
            raise FlextronError("--budget-ms must be positive and --budget-frac in (0, 10]")
        if not self.frontier and not self.budget_ms and not self.budget_frac:
            raise FlextronError("give --budget-ms X or --budget-frac F (repeatable), or --frontier")


def open_storage(cfg: SearchConfig, run_root: Path):
    import optuna

    url = cfg.storage or f"sqlite:///{run_root / 'search' / STORAGE_FILE}"
    if not cfg.storage:
        (run_root / "search").mkdir(parents=True, exist_ok=True)
    try:
        if url.endswith(".log") and "://" not in url:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=None)
    except Exception as e:
        raise FlextronError(f"cannot open Optuna storage {url!r}: {type(e).__name__}: {str(e)[:200]}") from e


def suggest_config(trial, spec) -> SubnetConfig:
    """Per-layer choices as ordinal indices (0 = narrowest): widths are nested and ordered, so TPE's
    numeric kernels share evidence between neighbouring widths instead of treating each as unrelated."""
    return SubnetConfig(
        tuple(ws[trial.suggest_int(f"mlp_idx_{l}", 0, len(ws) - 1)] for l, ws in enumerate(spec.mlp_widths)),
        tuple(hs[trial.suggest_int(f"heads_idx_{l}", 0, len(hs) - 1)] for l, hs in enumerate(spec.head_counts)),
    )


def config_params(cfg: SubnetConfig, spec) -> dict:
    return {**{f"mlp_idx_{l}": spec.mlp_widths[l].index(w) for l, w in enumerate(cfg.mlp_width)},
            **{f"heads_idx_{l}": spec.head_counts[l].index(h) for l, h in enumerate(cfg.heads)}}


def _constraints(trial):
    return trial.user_attrs.get("constraint", [0.0])


def _set_constraint(trial, values: list[float]) -> None:
    """Optuna >= 5 stores constraints on the trial; older releases read them via constraints_func."""
    trial.set_user_attr("constraint", values)
    if hasattr(trial, "set_constraint"):
        for i, v in enumerate(values):
            trial.set_constraint(f"latency_over_budget_ms_{i}", v)


def _tpe(seed: int, n_startup: int):
    """Univariate TPE over the ordinal choices: a sub-network's loss is close to additive in its
    per-layer widths (an additive ridge fit explains 85% of the variance of 260 measured SmolLM2
    configs), which is what per-parameter Parzen estimators model. At 24 evaluations in 60 dimensions
    it beat plain random search at every budget in 5 of 5 seeds (benchmarks/search_efficiency.py);
    multivariate TPE over categorical choices had lost to it at 0.8x with 12 evaluations."""
    import optuna

    kw = dict(seed=seed, multivariate=False, n_startup_trials=n_startup)
    if not hasattr(optuna.trial.Trial, "set_constraint"):
        kw["constraints_func"] = _constraints
    return optuna.samplers.TPESampler(**kw)


def full_latency_ms(run_root: Path, regime_key: str, spec) -> float:
    """The full model's measured end-to-end latency in this regime (the reference for fractions)."""
    import pandas as pd

    e2e = pd.read_parquet(run_root / "profile" / "e2e.parquet")
    row = e2e[(e2e["regime"] == regime_key) & (e2e["config_key"] == spec.full().key) & (e2e["status"] == "ok")]
    if row.empty:
        raise FlextronError(f"the full model was not measured end to end for {regime_key}; re-run `flextron profile`")
    return float(row["latency_ms_median"].iloc[0])


def feasible_range(lat_model, spec) -> tuple[float, float]:
    from profiler.latency_model import encode

    lo, hi = lat_model.predict(encode([spec.smallest(), spec.full()]))
    return float(lo), float(hi)


def search_budget(study_name, storage, spec, lat_model, evaluator, budget_ms, cfg: SearchConfig, progress=None,
                  routers=None) -> dict:
    """Run one budget's study until it holds `cfg.trials` evaluated (feasible) trials."""
    import optuna

    from profiler.latency_model import encode

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    random_sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    sampler = _tpe(cfg.seed, 0) if cfg.sampler == "tpe" else random_sampler
    # TPE's start-up phase counts *evaluated* trials: infeasible proposals carry no quality signal,
    # so random proposals continue until a few feasible configs were evaluated (or asks run long).
    n_startup = max(2, cfg.trials // 3)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, direction="minimize",
                                load_if_exists=True)
    study.set_user_attr("budget_ms", budget_ms)
    if not study.trials and cfg.sampler == "tpe":  # "random" is the plain baseline: no seeds
        # Seed the largest uniform configs that fit: at tight budgets random proposals rarely fit, and
        # they are the baseline the search must beat anyway. Only two, so most evaluations are TPE's.
        seeds = spec.uniform_configs()
        preds = lat_model.predict(encode(seeds))
        fitting = sorted(((p, s) for p, s in zip(preds, seeds) if p <= budget_ms), key=lambda ps: -ps[0])
        if routers is not None:  # the trained static router's answer for this budget goes first
            rc = routers.config_for(budget_ms, lat_model.predict_config)
            study.enqueue_trial(config_params(rc, spec), user_attrs={"source": "router"}, skip_if_exists=True)
        for _, seed_cfg in fitting[: max(1, min(2, cfg.trials // 4))]:  # the largest fitting ones: the rest is TPE's
            study.enqueue_trial(config_params(seed_cfg, spec), user_attrs={"source": "uniform"}, skip_if_exists=True)

    def evaluated():
        return sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                   if t.user_attrs.get("evaluated"))

    asked, bar = 0, (progress(total=cfg.trials, desc=f"search {budget_ms:.3g} ms") if progress else None)
    done = evaluated()
    max_asks = 20 * cfg.trials  # tight budgets reject many proposals; each rejection is cheap, but cap them
    while done < cfg.trials and asked < max_asks:
        if cfg.sampler == "tpe":
            study.sampler = random_sampler if done < n_startup and asked < 4 * cfg.trials else sampler
        trial = study.ask()
        asked += 1
        sub = suggest_config(trial, spec)
        pred = lat_model.predict_config(sub)
        trial.set_user_attr("predicted_latency_ms", pred)
        trial.set_user_attr("config", sub.to_json())
        _set_constraint(trial, [pred - budget_ms])
        if pred > budget_ms:
            trial.set_user_attr("evaluated", False)
            study.tell(trial, INFEASIBLE_LOSS)
            continue
        loss = evaluator.loss(sub)
        trial.set_user_attr("evaluated", True)
        study.tell(trial, loss)
        done = evaluated()
        if bar:
            bar.n = min(done, cfg.trials)
            bar.refresh()
    if bar:
        bar.close()
    return {"study": study_name, "budget_ms": budget_ms, "evaluated": done, "asked_here": asked}


def search_frontier(study_name, storage, spec, lat_model, evaluator, cfg: SearchConfig) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, directions=["minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=8),
                                load_if_exists=True)
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


def collect_trials(storage, prefix: str):
    """Every trial of this run's studies as one tidy table."""
    import optuna
    import pandas as pd

    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not s.study_name.startswith(prefix):
            continue
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            loss = t.values[-1] if t.values else None
            rows.append({"study": s.study_name, "trial": t.number, "budget_ms": study.user_attrs.get("budget_ms"),
                         "config": t.user_attrs.get("config"), "predicted_latency_ms": t.user_attrs.get("predicted_latency_ms"),
                         "evaluated": bool(t.user_attrs.get("evaluated")), "source": t.user_attrs.get("source", "search"),
                         "loss": loss if t.user_attrs.get("evaluated") else None})
    return pd.DataFrame(rows)


def pareto_front(df):
    """Non-dominated evaluated rows in (predicted latency, loss), sorted by latency."""
    ev = df[df["evaluated"]].drop_duplicates("config").sort_values(["predicted_latency_ms", "loss"])
    keep, best = [], float("inf")
    for idx, row in ev.iterrows():
        if row["loss"] < best:
            keep.append(idx)
            best = row["loss"]
    return ev.loc[keep]


def search(cfg: SearchConfig) -> dict:
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.routers import Routers, regime_dir
    from flextron.rundir import RunDir, save_stage_config, write_json_atomic
    from profiler.latency_model import LatencyModels
    from search.quality import QUALITY_CACHE, QualityEvaluator

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)  # first: a run with no model names `flextron convert`
    models = LatencyModels.load(run.root)
    regime_key = models.resolve(cfg.regime)
    lat_model = models.get(regime_key)
    storage = open_storage(cfg, run.root)
    elastic = ElasticModel.load(wdir, device=cfg.device)
    spec = elastic.spec
    lo, hi = feasible_range(lat_model, spec)
    routers = None
    if (regime_dir(run.root, regime_key) / "router.json").is_file():
        routers = Routers.load(run.root, regime_key, spec)
    budgets = list(cfg.budget_ms)
    if cfg.budget_frac:
        full_ms = full_latency_ms(run.root, regime_key, spec)
        budgets += [round(f * full_ms, 4) for f in cfg.budget_frac]
    if cfg.skip_infeasible:
        import sys

        for b in [b for b in budgets if b < lo]:
            print(f"flextron search: skipping budget {b:.4g} ms, below the smallest sub-network ({lo:.4g} ms)", file=sys.stderr)
        budgets = [b for b in budgets if b >= lo]
        if not budgets and not cfg.frontier:
            raise FlextronError(f"every budget is below the smallest sub-network ({lo:.4g} ms predicted for {regime_key}); "
                                f"feasible budgets run from {lo:.4g} to {hi:.4g} ms")
    for b in budgets:
        if b < lo:
            raise FlextronError(
                f"budget {b:.4g} ms is below the smallest sub-network ({lo:.4g} ms predicted for {regime_key} on "
                f"{models.device_name}); feasible budgets run from {lo:.4g} to {hi:.4g} ms"
            )
    evaluator = QualityEvaluator(elastic, run / "search" / QUALITY_CACHE, cfg.eval_windows, cfg.eval_seq_len, tag=wname)
    prefix = cfg.study_prefix or f"{models.device_name}|{regime_key}|{cfg.sampler}" + ("" if wname == "elastic" else f"|{wname}")
    t0 = time.perf_counter()
    results = []
    if cfg.frontier:
        results.append(search_frontier(f"{prefix}|frontier", storage, spec, lat_model, evaluator, cfg))
    for b in sorted(budgets):
        results.append(search_budget(f"{prefix}|budget={b:.6g}", storage, spec, lat_model, evaluator, b, cfg, progress, routers))
    trials = collect_trials(storage, prefix)
    out = run / "search"
    out.mkdir(parents=True, exist_ok=True)
    trials.assign(regime=regime_key, device_name=models.device_name).to_parquet(out / "trials.parquet", index=False)
    front = pareto_front(trials)
    front.assign(regime=regime_key).to_parquet(out / "pareto.parquet", index=False)
    best = []
    for b in sorted(budgets):
        ok = trials[(trials["budget_ms"] == b) & trials["evaluated"]]
        if ok.empty:
            continue
        r = ok.loc[ok["loss"].idxmin()]
        best.append({"budget_ms": b, "regime": regime_key, "config": json.loads(r["config"]),
                     "predicted_latency_ms": r["predicted_latency_ms"], "loss": r["loss"],
                     "source": r["source"]})  # search, or the seed it came from: uniform or router
    write_json_atomic(out / f"best-{regime_key.replace(':', '_')}.json",
                      {"regime": regime_key, "device_name": models.device_name, "best": best, "weights": wname,
                       "quality_setting": evaluator.setting})
    save_stage_config(out / "search_config.json", cfg)
    return {
        "regime": regime_key, "budgets_ms": budgets, "feasible_ms": [round(lo, 4), round(hi, 4)],
        "quality_evaluations": evaluator.evaluations,
        "evaluated_trials": int(trials["evaluated"].sum()) if len(trials) else 0,
        "infeasible_skipped": int((~trials["evaluated"]).sum()) if len(trials) else 0,
        "eval_tokens": evaluator.tokens,
        "best": [{"budget_ms": b["budget_ms"], "ppl": round(math.exp(b["loss"]), 3),
                  "predicted_ms": round(b["predicted_latency_ms"], 4)} for b in best],
        "seconds": round(time.perf_counter() - t0, 1),
    }

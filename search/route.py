"""`flextron route`: train the routers of one regime against the surrogate and the latency model's
`[layers, choices]` table, or answer a budget with the trained static router.

The method lives in `flextron/` (latency as plain tensors and callables): the table in
`latency_table.py`, `surrogate.py`, `static_router.py`, `dynamic_router.py`, and `router_store.py` for
the folder. This stage wires them up: it loads the latency model (an analytic table, labelled so, only
when the regime was never profiled), the quality cache and the weights, and writes
`RUN/router/<regime>/<weights>/`: built in a temporary folder and swapped in whole, so a killed re-run
never leaves new weights beside old calibration.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, replace

from flextron.devices import set_device_field
from flextron.dynamic_router import CALIB_ITERS, CALIB_MAX_SHIFT, DynamicRouting, DynamicTrainer, calibrate_dynamic
from flextron.errors import FlextronError
from flextron.latency_table import PENALTY_LINEAR, LatencyTable, expected_latency
from flextron.router_store import Routers, regime_dir, save_tensors
from flextron.rundir import WEIGHTS, check_finite
from flextron.spec import Regime
from flextron.static_router import STATIC_HIDDEN, static_answer, train_static
from flextron.surrogate import SURROGATE_HIDDEN, fit_surrogate, one_hot, sample_configs
from search.route_select import select_serving


def fitted_model(run_root, regime: str | None):
    """(regime key, LatencyModel, device name) of the run, or None when the named regime was never
    profiled (the caller then uses the analytic table, and says so). Everything else is an error: a
    regime that does not parse, a profiled regime not fitted yet, or (no regime named) no fit at all."""
    from profiler.latency_model import LatencyModels
    from profiler.profile import profiled_regimes

    if regime is None:
        models = LatencyModels.load(run_root)
        key = models.resolve(None)
        return key, models.get(key), models.device_name
    Regime.parse_option(regime)
    if LatencyModels.fitted(run_root):
        models = LatencyModels.load(run_root)
        if any(k == regime or k.startswith(regime + ":") for k in models.models):
            key = models.resolve(regime)
            return key, models.get(key), models.device_name
    if any(k == regime or k.startswith(regime + ":") for k in profiled_regimes(run_root)):
        raise FlextronError(f"regime {regime} was profiled but its latency model is not fitted yet; "
                            f"run `flextron fit --run {run_root}` first")
    return None


def table_for(spec, regime: str | None, fitted, run_root=None, full_ms: float | None = None) -> LatencyTable:
    """The measured table from the fitted latency model, scaled to the full model's measured step
    (`full_ms`, else read from the run's profile in `run_root`: the reference every budget fraction is
    of), else the analytic one (labelled so)."""
    if fitted is None:
        return LatencyTable.analytic(spec, regime)
    key, model, device = fitted
    return LatencyTable.from_model(model, spec, key, device, full_ms or reference_ms(run_root, key, spec))


def reference_ms(run_root, regime_key: str, spec) -> float | None:
    """The full model's measured median step in the run's profile (None without a run)."""
    if run_root is None:
        return None
    from profiler.profile import Profile

    return Profile.load(run_root).full_ms(regime_key, spec)


def searched_configs(run, regime_key: str, weights: str) -> list:
    """The configs `flextron search` picked for this regime on these weights (none when it has not run,
    or ran on weights `flextron train` has replaced since)."""
    from flextron.rundir import read_json
    from flextron.spec import SubnetConfig
    from search.optuna_search import results_dir

    path = results_dir(run.root, regime_key, weights) / "best.json"
    if not path.is_file():
        return []
    best = read_json(path, run.root)
    if best.get("weights_tag", weights) != run.weights_tag(weights):
        return []
    return [SubnetConfig.from_dict(b["config"]) for b in best.get("best", []) if isinstance(b.get("config"), dict)]


def latency_table(run_root, regime: str | None, spec) -> LatencyTable:
    return table_for(spec, regime, fitted_model(run_root, regime), run_root)


@dataclass(frozen=True)
class RouteConfig:
    #: the run directory (converted; profiled and fitted for measured latency); writes RUN/router/
    run: str
    #: the regime the routers are trained for (short form accepted); empty: the run's only fitted regime.
    #: A regime never profiled is refused unless --analytic
    regime: str = ""
    #: train on an analytic FLOPs/bytes table when --regime was never profiled (labelled "analytic" wherever
    #: it shows); without it such a regime is refused (a mistyped regime must not train on made-up costs)
    analytic: bool = False
    #: > 0: print the trained static router's config for this budget in ms of per-step latency (no
    #: training; needs the regime's latency model); 0: train the routers
    budget_ms: float = 0.0
    #: elastic (one-shot) | trained | auto (trained when `flextron train` made it); routers are kept per weights
    weights: str = "auto"
    #: heterogeneous configs whose validation loss the surrogate is fitted on, besides the uniform ones
    surrogate_samples: int = 40
    #: the surrogate's held-out mean relative loss error must be at most this, else no router is trained
    surrogate_threshold: float = 0.05
    surrogate_steps: int = 1500  #: AdamW steps fitting the surrogate
    surrogate_lr: float = 3e-3  #: the surrogate's learning rate
    surrogate_hidden: int = SURROGATE_HIDDEN  #: units of each of the surrogate's two hidden layers
    static_hidden: int = STATIC_HIDDEN  #: units of each of the static router's two hidden layers
    #: budgets, evenly from the smallest feasible one to the full model, at which the static answers are
    #: reported and the dynamic router is calibrated (the budgets it can serve)
    grid_points: int = 9
    static_steps: int = 800  #: training steps of the static router (32 random budgets each)
    #: training steps of the dynamic router, model frozen; 0: it is only calibrated, untrained
    dynamic_steps: int = 20
    #: weight of the penalty on expected latency over budget against the loss; 0: latency is ignored
    latency_weight: float = 20.0
    #: the penalty's linear term: weight x (r^2 + this x r), r the relative overshoot of expected latency
    penalty_linear: float = PENALTY_LINEAR
    eval_windows: int = 8  #: validation windows per config whose loss the surrogate is fitted on
    eval_seq_len: int = 128  #: tokens per validation window
    calib_windows: int = 4  #: calibration-split windows the dynamic router's per-budget shift is fitted on
    calib_iters: int = CALIB_ITERS  #: bisection steps of each budget's logit shift
    #: the largest logit shift toward narrower widths a budget may get (one the narrowest routing misses gets it)
    calib_max_shift: float = CALIB_MAX_SHIFT
    #: a layer whose calibrated choice is one width for at least this share of calibration tokens serves
    #: that width without routing (no router matmul); 1: only layers where every token took one width
    #: (serving then computes exactly what routing would); above 1: every layer is routed
    fix_share: float = 1.0
    #: calibration-split windows on which dynamic routing and the static configs are compared per budget
    select_windows: int = 16
    #: interleaved timing rounds (full model in each) of the dynamic-vs-static comparison per budget
    select_rounds: int = 5
    select_reps: int = 5  #: timed calls per config per round in that comparison
    select_warmup: int = 2  #: untimed calls before each config's timed ones
    threads: int = 0  #: CPU: torch intra-op threads while timing; 0 = one (steady on small, shared CPUs)
    batch_size: int = 4  #: train-split windows per dynamic-router training step
    seq_len: int = 128  #: tokens per training and calibration window
    lr: float = 3e-3  #: Adam learning rate of the static and dynamic routers
    device: str = "auto"  #: where the model runs for losses and training: cpu, cuda, cuda:N or auto (CUDA when present)
    #: seeds config sampling, the surrogate's fit and split, router training and its random budgets
    seed: int = 0
    #: text for the surrogate's losses, router training and calibration; empty: the corpus the run was
    #: converted with
    corpus: str = ""

    def __post_init__(self):
        check_finite("budget_ms", self.budget_ms, low=0)
        check_finite("surrogate_threshold", self.surrogate_threshold, low=0, low_inclusive=False, high=1)
        for name, low in (("surrogate_samples", 4), ("static_steps", 1), ("dynamic_steps", 0), ("eval_windows", 1),
                          ("eval_seq_len", 2), ("calib_windows", 1), ("batch_size", 1), ("seq_len", 2),
                          ("latency_weight", 0), ("select_windows", 1), ("select_rounds", 2), ("select_reps", 1),
                          ("select_warmup", 0), ("threads", 0), ("penalty_linear", 0)):
            check_finite(name, getattr(self, name), low=low)
        check_finite("fix_share", self.fix_share, low=0.5)
        check_finite("lr", self.lr, low=0, low_inclusive=False)
        check_finite("surrogate_lr", self.surrogate_lr, low=0, low_inclusive=False)
        check_finite("surrogate_steps", self.surrogate_steps, low=1, whole=True)
        check_finite("grid_points", self.grid_points, low=2, whole=True)
        check_finite("calib_iters", self.calib_iters, low=1, whole=True)
        check_finite("calib_max_shift", self.calib_max_shift, low=0, low_inclusive=False)
        check_finite("surrogate_hidden", self.surrogate_hidden, low=1, whole=True)
        check_finite("static_hidden", self.static_hidden, low=1, whole=True)
        check_finite("seed", self.seed)
        set_device_field(self)
        if self.weights not in WEIGHTS:
            raise FlextronError(f"--weights must be one of {list(WEIGHTS)}, got {self.weights!r}")
        if self.regime:
            Regime.parse_option(self.regime)


def route(cfg: RouteConfig) -> dict:
    """Train the routers of one regime and weights into RUN/router/<regime>/<weights>/, or (with
    `budget_ms`) answer that budget with the trained static router; returns the one-line summary."""
    from flextron.budget import Budget
    from flextron.data import token_windows
    from flextron.devices import check_device
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import RunDir, fresh_tmp_dir, recover_swap, save_stage_config, swap_in, write_json_atomic
    from flextron.spec import ElasticSpec
    from search.quality import QUALITY_CACHE, QualityEvaluator

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)
    check_device(cfg.device)
    spec = ElasticSpec.load(wdir / "elastic_spec.json")
    fitted = fitted_model(run.root, cfg.regime or None)
    if fitted is None and not cfg.analytic and cfg.budget_ms <= 0:
        from profiler.profile import profiled_regimes

        raise FlextronError(
            f"regime {cfg.regime} was never profiled in {run.root} (profiled: {sorted(profiled_regimes(run.root))}); "
            f"profile and fit it (`flextron profile --run {run.root} --regime {cfg.regime}`, then `flextron fit "
            f"--run {run.root}`), or pass --analytic to train the routers on an analytic FLOPs/bytes table")
    predict = fitted[1].predict_config if fitted else None
    # the Budget's reference, the full model measured in the profile: read once, the table scaled to it
    reference = reference_ms(run.root, fitted[0], spec) if fitted else None
    table = table_for(spec, cfg.regime or None, fitted, full_ms=reference)
    regime_key = table.regime
    folder = regime_dir(run.root, regime_key, weights=wname)
    if cfg.budget_ms > 0:
        routers = Routers(folder, spec, run.root)
        if predict is None:
            raise FlextronError(f"--budget-ms needs a latency model for {regime_key}; "
                                "run `flextron profile` and `flextron fit` first")
        lo = predict(spec.smallest())
        if cfg.budget_ms < lo:
            raise FlextronError(f"budget {cfg.budget_ms} ms is below the smallest sub-network "
                                f"({lo:.4g} ms predicted for {regime_key})")
        c = routers.config_for(cfg.budget_ms, predict)
        return {"regime": regime_key, "budget_ms": cfg.budget_ms, "config": c.to_dict(),
                "predicted_latency_ms": round(predict(c), 4), "source": "router",
                "table_source": routers.meta["table"]["source"]}

    if fitted is None:
        print(f"flextron route: regime {regime_key} was never profiled; the routers are trained on an analytic "
              f"FLOPs/bytes table, not measured latency (profile and fit it for a measured one)", file=sys.stderr)
    cfg = replace(cfg, corpus=run.corpus(cfg.corpus))  # saved as resolved
    t0 = time.perf_counter()
    elastic = ElasticModel.load(wdir, device=cfg.device)
    evaluator = QualityEvaluator(elastic, run / "search" / QUALITY_CACHE, cfg.eval_windows, cfg.eval_seq_len,
                                 corpus=cfg.corpus, tag=run.weights_tag(wname))
    cfgs = sample_configs(spec, cfg.surrogate_samples, cfg.seed)
    losses = [evaluator.loss(c) for c in progress(cfgs, desc="surrogate samples")]
    sur, sur_metrics = fit_surrogate(spec, cfgs, losses, cfg.seed, cfg.surrogate_steps, cfg.surrogate_lr,
                                    cfg.surrogate_hidden)
    if sur_metrics["heldout_mean_rel_err"] > cfg.surrogate_threshold:
        raise FlextronError(
            f"the surrogate's held-out relative error is {sur_metrics['heldout_mean_rel_err']:.3f}, above "
            f"--surrogate-threshold {cfg.surrogate_threshold}; evaluate more configs "
            f"(--surrogate-samples {2 * cfg.surrogate_samples}) before training routers")
    smallest_frac = table.smallest_frac
    static, static_hist = train_static(spec, sur, table, smallest_frac, cfg.static_steps, cfg.latency_weight,
                                       cfg.seed, cfg.lr, hidden=cfg.static_hidden, penalty_linear=cfg.penalty_linear)
    # the static answer at a budget fraction, computed once per fraction: reported on the grid below,
    # and the dynamic router's heads at every budget it trains and calibrates at
    answer = functools.cache(functools.partial(static_answer, static, sur, spec, predict=predict,
                                               full_ms=table.full if predict is not None else None))

    def heads_for(t: float) -> tuple[int, ...]:
        """The dynamic router's heads at budget fraction t: the static answer's."""
        return answer(t).heads

    def budget_of(t: float) -> dict:
        """The Budget a router input t stands for: t of the table's full model in ms, and that as a
        fraction of the reference (the full model measured in the profile), as search and verify use."""
        ms = t * table.full
        if not reference:  # never profiled: the analytic table has no measured reference
            return {"budget_ms": round(ms, 6), "reference_full_ms": None, "budget_frac": None}
        b = Budget(regime_key, budget_ms=ms).resolve(reference)
        return {"budget_ms": b.budget_ms, "reference_full_ms": b.reference_full_ms, "budget_frac": b.budget_frac}

    # the budget grid: the static answers are reported there, and the dynamic router is calibrated there
    n = cfg.grid_points - 1
    grid = [round(smallest_frac + (1 - smallest_frac) * i / n, 4) for i in range(cfg.grid_points)]
    grid_answers = {t: answer(t) for t in grid}

    # dynamic router: model frozen, routers trained on train-split windows against the frozen original
    teacher = ElasticModel.load(run.elastic, device=cfg.device)
    for p in list(elastic.model.parameters()) + list(teacher.model.parameters()):
        p.requires_grad_(False)
    windows = token_windows(elastic.tokenizer, elastic.adapter, "train", cfg.seq_len,
                            max(1, cfg.dynamic_steps * cfg.batch_size), cfg.corpus)
    routing = DynamicRouting(elastic)
    routing.install()
    trainer = DynamicTrainer(elastic, routing, teacher, windows, table, heads_for, batch_size=cfg.batch_size,
                             latency_weight=cfg.latency_weight, seed=cfg.seed, penalty_linear=cfg.penalty_linear)
    dyn_hist = trainer.train_router(cfg.dynamic_steps, cfg.lr)
    # everything goes to a temporary folder, swapped in whole at the end
    recover_swap(folder)
    tmp = fresh_tmp_dir(folder)
    save_tensors(tmp / "dynamic_router.safetensors", routing.state_dict())
    # budget calibration on held-apart calibration text: per budget, the logit shift whose hard routing
    # meets it in expectation, so the dynamic router answers budgets however short its training was
    calib_windows = token_windows(elastic.tokenizer, elastic.adapter, "calibration", cfg.seq_len, cfg.calib_windows,
                                  cfg.corpus)

    points = calibrate_dynamic(elastic, routing, calib_windows, table, heads_for, grid, fix_share=cfg.fix_share,
                               iters=cfg.calib_iters, bound=cfg.calib_max_shift)
    routing.remove()
    # per budget: dynamic routing against the static router's configs, loss on calibration text and
    # latency measured side by side; dynamic is kept only where it measured better (see serving.decide)
    select_windows = token_windows(elastic.tokenizer, elastic.adapter, "calibration", cfg.seq_len, cfg.select_windows,
                                   cfg.corpus)
    candidates = [*grid_answers.values(), *spec.uniform_configs(), *searched_configs(run, regime_key, wname)]
    points, selection = select_serving(elastic, routing, points, candidates, select_windows, table,
                                       Regime.parse(regime_key), cfg.device, rounds=cfg.select_rounds,
                                       reps=cfg.select_reps, warmup=cfg.select_warmup, seed=cfg.seed,
                                       threads=cfg.threads, progress=progress)
    dyn_calib = [{**p, **budget_of(p["router_frac"])} for p in points]

    save_tensors(tmp / "static_router.safetensors", static.state_dict())
    save_tensors(tmp / "surrogate.safetensors", sur.state_dict())
    answers = []
    for t, c in grid_answers.items():
        pe = float(expected_latency(table, *one_hot(spec, [c]))[0])
        answers.append({"router_frac": t, **budget_of(t), "expected_frac": round(pe, 4),
                        "predicted_ms": round(predict(c), 4) if predict else None, "config": c.to_dict()})
    meta = {"regime": regime_key, "weights": wname, "weights_tag": run.weights_tag(wname),
            "quality_setting": evaluator.setting,  # the surrogate's losses: split, corpus@content id, windows
            "seconds": round(time.perf_counter() - t0, 1), "reference_full_ms": reference,
            # the networks' sizes, so `Routers` rebuilds them as trained
            "architecture": {"surrogate_hidden": cfg.surrogate_hidden, "static_hidden": cfg.static_hidden},
            "table": {"source": table.source, "unit": table.unit, "full_ms": table.full,
                      "smallest_frac": smallest_frac},
            "surrogate": {**sur_metrics, "threshold": cfg.surrogate_threshold, "samples": len(cfgs),
                          "quality_evaluations": evaluator.evaluations},
            "static_history": static_hist, "dynamic_history": dyn_hist,
            "static_answers": answers, "dynamic_calibration": dyn_calib, "selection": selection,
            "calibration_tokens": calib_windows.numel(),
            "tokens": {"dynamic": cfg.dynamic_steps * cfg.batch_size * cfg.seq_len}}
    write_json_atomic(tmp / "router.json", meta)
    save_stage_config(tmp / "route_config.json", cfg)
    swap_in(tmp, folder)
    return {"regime": regime_key, "routers": str(folder), "table_source": table.source,
            "surrogate_heldout_rel_err": round(sur_metrics["heldout_mean_rel_err"], 4),
            "static_answers": [{k: a[k] for k in ("budget_frac", "budget_ms", "expected_frac", "predicted_ms")}
                               for a in answers],
            "served": [{"budget_frac": p["budget_frac"], "router_frac": p["router_frac"], "serve": p["serve"]}
                       for p in dyn_calib],
            "ratio_noise_floor_pct": selection["noise"]["ratio_noise_floor_pct"], "seconds": meta["seconds"]}

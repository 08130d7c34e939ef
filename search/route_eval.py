"""`flextron eval --router static|dynamic --budget-ms X`: a budget served by the run's routers, scored
and timed as a deployment runs it.

The static router answers the budget with one config; the dynamic router serves its calibrated point
for the budget (dynamic routing, or the static config its calibration measured better: see
`flextron/serving.py`). Quality is validation perplexity with the served form attached; latency is
the expected step (latency table) and the measured step, timed on real validation tokens in
interleaved rounds beside the full model, with the rounds' noise floor.
"""

from __future__ import annotations

import math
import sys

from flextron.evaluate import EvalConfig


def evaluate_routed(cfg: EvalConfig) -> dict:
    from flextron.data import token_windows
    from flextron.devices import check_device, set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.errors import FlextronError
    from flextron.evaluate import mean_loss
    from flextron.latency_table import expected_latency
    from flextron.progress import progress
    from flextron.router_store import Routers
    from flextron.rundir import RunDir
    from flextron.serving import Served
    from flextron.spec import Regime
    from flextron.surrogate import one_hot
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import noise_floor
    from search.route import fitted_model, table_for

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)
    check_device(cfg.device)
    elastic = ElasticModel.load(wdir, device=cfg.device)
    spec = elastic.spec
    fitted = fitted_model(run.root, cfg.regime or None)
    table = table_for(spec, cfg.regime or None, fitted, run.root)
    routers = Routers.load(run.root, table.regime, spec, weights=wname)
    predict = fitted[1].predict_config if fitted else None
    if cfg.router == "static":
        if predict is None:
            raise FlextronError(f"--router static needs a latency model for {table.regime}; run `flextron profile` "
                                "and `flextron fit` first")
        c = routers.config_for(cfg.budget_ms, predict)
        served = Served(elastic, {"router_frac": cfg.budget_ms / table.full, "serve": "static",
                                  "selection": {"static": {"config": c.to_dict()}, "reason": "the static router"}})
    else:
        served = routers.serve(elastic, cfg.budget_ms)
    if served.mode == "dynamic":
        expected_frac = float(served.routed["expected_frac"])
    else:
        expected_frac = float(expected_latency(table, *one_hot(spec, [served.config]))[0])
    corpus = run.corpus(cfg.corpus)
    windows = token_windows(elastic.tokenizer, elastic.adapter, cfg.split, cfg.seq_len, cfg.windows, corpus)
    with served:
        loss = mean_loss(elastic, served.config, windows, cfg.batch_size)
    threads = set_cpu_threads(cfg.device, cfg.threads)  # for the timing (scoring above ran at torch's count)
    regime = Regime.parse(table.regime)
    if served.mode == "dynamic" and regime.mode != "eager":
        raise FlextronError(f"dynamic routing cannot run under {regime.mode}; its calibration serves static there")
    with InterleavedSession(elastic, regime, cfg.device, cfg.reps, warmup=2, seed=0, text=windows.reshape(-1),
                            threads=threads, source_gguf=run.source_gguf() if regime.engine == "llamacpp" else None
                            ) as session:
        session.run({"served": served.config}, cfg.rounds, progress, setups={"served": lambda: served})
        measured = session.ratios()
        noise = noise_floor(session.samples, FULL)
    key = "served"
    budget_frac = cfg.budget_ms / routers.meta["reference_full_ms"] if routers.meta.get("reference_full_ms") else None
    if budget_frac is not None and measured[key]["ratio_to_full"] > budget_frac:
        print(f"flextron eval: the served {served.mode} step measured {measured[key]['ratio_to_full']:.3f}x of the "
              f"full model, over the budget's {budget_frac:.3f}x", file=sys.stderr)
    measured_table = table.unit == "ms"
    return {
        "router": cfg.router, "serve": served.mode, "regime": table.regime, "weights": wname,
        "budget_ms": cfg.budget_ms, "budget_frac": None if budget_frac is None else round(budget_frac, 4),
        "served": served.describe(),
        "split": cfg.split, "tokens": int(windows[:, 1:].numel()), "loss": round(loss, 5),
        "ppl": round(math.exp(loss), 4),
        "expected_ms": round(expected_frac * table.full, 4) if measured_table else None,
        "expected_frac": round(expected_frac, 4),
        "measured_ms": round(measured[key]["measured_ms"], 4),
        "measured_frac": round(measured[key]["ratio_to_full"], 4),
        "full_measured_ms": round(measured[FULL]["measured_ms"], 4),
        "ratio_noise_floor_pct": noise["ratio_noise_floor_pct"], "rounds": cfg.rounds, "reps": cfg.reps,
        "threads": threads, "device": str(elastic.device),
    }

"""`flextron verify`: measure chosen configs end to end on the device; replace any that miss.

Measured latency, not predicted, is what the lookup and the reports quote. A config whose
measurement exceeds its budget is replaced by the next best evaluated config predicted to fit,
which is measured in turn (a capped number of times).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from flextron.errors import FlextronError
from flextron.spec import Regime, SubnetConfig

VERIFIED_FILE = "verified.parquet"
UNIFORM_FILE = "uniform.parquet"  # the uniform configs measured in the same session as the picks
MAX_REPLACEMENTS = 5


@dataclass(frozen=True)
class VerifyConfig:
    run: str = "runs/demo"
    device: str = "cpu"
    min_reps: int = 20
    min_time_ms: float = 100.0
    tolerance: float = 0.0  # a measurement may exceed its budget by this fraction (0.02 = 2%)

    def __post_init__(self):
        if not 0 <= self.tolerance < 0.5:
            raise FlextronError(f"--tolerance must be in [0, 0.5), got {self.tolerance}")


def verify(cfg: VerifyConfig) -> dict:
    import math

    import pandas as pd
    import torch

    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir, save_stage_config
    from profiler.sweep import RegimeBench
    from profiler.telemetry import Telemetry
    from profiler.timer import Timer, TimerConfig

    run = RunDir(cfg.run)
    search_dir = run.require("search")
    best_files = sorted(search_dir.glob("best-*.json"))
    if not best_files:
        raise FlextronError(f"{search_dir} holds no search results; run `flextron search --run {run.root} ...` first")
    device_name = Telemetry(cfg.device).device_name
    elastic = ElasticModel.load(run.elastic)
    trials = pd.read_parquet(search_dir / "trials.parquet")
    rows, uniform_rows, t0 = [], [], time.perf_counter()
    measured_cache: dict[tuple[str, str], float] = {}
    for bf in best_files:
        best = json.loads(bf.read_text())
        if best["device_name"] != device_name:
            raise FlextronError(f"{bf.name} was searched for {best['device_name']!r} but this device is {device_name!r}; "
                                "verify on the device that was profiled")
        regime = Regime.parse(best["regime"])
        elastic.to(device=cfg.device, dtype=getattr(torch, regime.dtype))
        timer = Timer(cfg.device, regime.mode, TimerConfig(min_reps=cfg.min_reps, min_time_s=cfg.min_time_ms / 1e3))
        bench = RegimeBench(elastic, regime, cfg.device)

        def measure(sub: SubnetConfig) -> float:
            k = (regime.key, sub.key)
            if k not in measured_cache:
                measured_cache[k] = timer.measure(bench.forward_fn(sub)).median_ms
            return measured_cache[k]

        for b in best["best"]:
            budget = b["budget_ms"]
            limit = budget * (1 + cfg.tolerance)
            sub = SubnetConfig.from_dict(b["config"])
            pred, loss = b["predicted_latency_ms"], b["loss"]
            meas = measure(sub)
            replaced = 0
            if meas > limit:
                cands = trials[(trials["budget_ms"] == budget) & trials["evaluated"]].sort_values("loss")
                for c in cands.itertuples():
                    if replaced >= MAX_REPLACEMENTS:
                        break
                    alt = SubnetConfig.from_json(c.config)
                    if alt == sub:
                        continue
                    replaced += 1
                    m = measure(alt)
                    if m <= limit:
                        sub, pred, loss, meas = alt, c.predicted_latency_ms, c.loss, m
                        break
            rows.append({"regime": regime.key, "device_name": device_name, "budget_ms": budget,
                         "config": sub.to_json(), "config_key": sub.key, "predicted_latency_ms": pred,
                         "measured_latency_ms": meas, "loss": loss, "ppl": math.exp(loss),
                         "within_budget": meas <= limit, "replacements_tried": replaced, "source": b["source"]})
        # The uniform configs the lookup may fall back to are measured again here, in the same
        # session as the picks, so the lookup never compares latencies from different sessions.
        for sub in elastic.spec.uniform_configs():
            uniform_rows.append({"regime": regime.key, "device_name": device_name, "config": sub.to_json(),
                                 "config_key": sub.key, "measured_latency_ms": measure(sub)})
    out = run / "verify"
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_parquet(out / VERIFIED_FILE, index=False)
    pd.DataFrame(uniform_rows).to_parquet(out / UNIFORM_FILE, index=False)
    save_stage_config(out / "verify_config.json", cfg)
    return {"device": device_name, "verified": len(df), "within_budget": int(df["within_budget"].sum()),
            "max_measured_over_budget": round(float((df["measured_latency_ms"] / df["budget_ms"]).max()), 4),
            "seconds": round(time.perf_counter() - t0, 1)}

"""`flextron verify`: measure chosen configs end to end on the device; replace any that miss.

Measured latency, not predicted, is what the lookup and the reports quote. Every search result
(`RUN/search/<regime>/<weights>/best.json`) is verified. A config whose measurement exceeds its
budget is replaced by the next best config evaluated for the same budget, regime and weights,
which is measured in turn (a capped number of times). The uniform configs the lookup may fall back
to are measured in the same session, once per regime.
"""

from __future__ import annotations

import math
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
        from flextron.devices import check_device_name
        from flextron.rundir import check_finite

        check_device_name(self.device)
        check_finite("min_reps", self.min_reps, low=1)
        check_finite("min_time_ms", self.min_time_ms, low=0)
        check_finite("tolerance", self.tolerance, low=0, high=0.5)


def _best_files(run) -> list:
    search_dir = run.require("search")
    files = sorted(search_dir.glob("*/*/best.json"))
    if not files:
        raise FlextronError(f"{search_dir} holds no search results; run `flextron search --run {run.root} ...` first")
    return files


def verify(cfg: VerifyConfig) -> dict:
    import pandas as pd
    import torch

    from flextron.devices import check_device
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir, read_json, read_parquet, save_stage_config, write_parquet_atomic
    from profiler.sweep import RegimeBench
    from profiler.telemetry import Telemetry
    from profiler.timer import Timer, TimerConfig

    run = RunDir(cfg.run)
    best_files = _best_files(run)
    check_device(cfg.device)
    device_name = Telemetry(cfg.device).device_name
    picks = []
    for bf in best_files:
        best = read_json(bf, run.root)
        if best.get("device_name") != device_name:
            raise FlextronError(f"{bf} was searched for {best.get('device_name')!r} but this device is {device_name!r}; "
                                "verify on the device that was profiled")
        picks.append((bf, best))
    # Latency depends on shapes, not on weight values: one-shot weights time every pick.
    elastic = ElasticModel.load(run.elastic)
    rows, uniform_rows, t0 = [], [], time.perf_counter()
    measured_cache: dict[tuple[str, str], float] = {}
    benches: dict[str, tuple] = {}

    def measure(regime: Regime, sub: SubnetConfig) -> float:
        k = (regime.key, sub.key)
        if k not in measured_cache:
            if regime.key not in benches:
                elastic.to(device=cfg.device, dtype=getattr(torch, regime.dtype))
                benches.clear()  # one regime's bench at a time (dtype and device follow the regime)
                timer = Timer(cfg.device, regime.mode, TimerConfig(min_reps=cfg.min_reps, min_time_s=cfg.min_time_ms / 1e3))
                benches[regime.key] = (timer, RegimeBench(elastic, regime, cfg.device))
            timer, bench = benches[regime.key]
            ms = timer.measure(bench.forward_fn(sub)).median_ms
            if not math.isfinite(ms) or ms <= 0:
                raise FlextronError(f"measuring {sub.key} in {regime.key} gave {ms} ms; nothing was written. "
                                    "Raise --min-reps / --min-time-ms")
            measured_cache[k] = ms
        return measured_cache[k]

    for bf, best in picks:
        regime = Regime.parse(best["regime"])
        weights = best.get("weights", "elastic")
        trials_path = bf.with_name("trials.parquet")
        trials = read_parquet(trials_path, run.root) if trials_path.is_file() else pd.DataFrame(
            columns=["budget_ms", "evaluated", "loss", "config", "predicted_latency_ms"])
        for b in best["best"]:
            budget = b["budget_ms"]
            limit = budget * (1 + cfg.tolerance)
            sub = orig = elastic.spec.validate(SubnetConfig.from_dict(b["config"]))
            pred, loss, source = b["predicted_latency_ms"], b["loss"], b["source"]
            meas = measure(regime, sub)
            replaced = 0
            if meas > limit:
                cands = trials[(trials["budget_ms"] == budget) & trials["evaluated"]].drop_duplicates("config")
                for c in cands.sort_values("loss").itertuples():
                    if replaced >= MAX_REPLACEMENTS:
                        break
                    alt = SubnetConfig.from_json(c.config)
                    if alt == sub:
                        continue
                    replaced += 1
                    m = measure(regime, alt)
                    if m <= limit:
                        sub, pred, loss, meas, source = alt, c.predicted_latency_ms, c.loss, m, c.source
                        break
            rows.append({"regime": regime.key, "device_name": device_name, "weights": weights, "budget_ms": budget,
                         "budget_frac": b.get("budget_frac"), "reference_full_ms": b.get("reference_full_ms"),
                         "config": sub.to_json(), "config_key": sub.key, "predicted_latency_ms": pred,
                         "measured_latency_ms": meas, "loss": loss, "ppl": math.exp(loss),
                         "within_budget": meas <= limit, "replacements_tried": replaced, "replaced": sub != orig,
                         "source": source})
    # The uniform configs the lookup may fall back to are measured again here, in the same
    # session as the picks, so the lookup never compares latencies from different sessions.
    for regime_key in sorted({r["regime"] for r in rows}):
        regime = Regime.parse(regime_key)
        for sub in elastic.spec.uniform_configs():
            uniform_rows.append({"regime": regime.key, "device_name": device_name, "config": sub.to_json(),
                                 "config_key": sub.key, "measured_latency_ms": measure(regime, sub)})
    if not rows:
        raise FlextronError("the search results hold no evaluated picks to verify; run `flextron search` with more --trials")
    out = run / "verify"
    df = pd.DataFrame(rows)
    write_parquet_atomic(df, out / VERIFIED_FILE)
    write_parquet_atomic(pd.DataFrame(uniform_rows), out / UNIFORM_FILE)
    save_stage_config(out / "verify_config.json", cfg)
    return {"device": device_name, "verified": len(df), "within_budget": int(df["within_budget"].sum()),
            "replaced": int(df["replaced"].sum()),
            "max_measured_over_budget": round(float((df["measured_latency_ms"] / df["budget_ms"]).max()), 4),
            "seconds": round(time.perf_counter() - t0, 1)}

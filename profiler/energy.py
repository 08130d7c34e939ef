"""Energy per token: NVML's cumulative energy counter read around a span of repeated steps."""

from __future__ import annotations

import time

from flextron.spec import Regime


def energy_per_token(tele, fn, regime: Regime, seconds: float) -> float | None:
    """mJ per generated/processed token from the NVML energy counter over >= `seconds` of runs
    (the counter updates every few ms, so short spans would read as zero or one step). `tele` is a
    `profiler.telemetry.Telemetry`, `fn` one step of `regime`; None where the counter is unavailable."""
    import torch

    if tele.energy_mj() is None:
        return None
    torch.cuda.synchronize()
    e0, t0, runs = tele.energy_mj(), time.perf_counter(), 0
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                fn()
            runs += 10
            torch.cuda.synchronize()
    e1 = tele.energy_mj()
    return (e1 - e0) / (runs * regime.batch * regime.new_tokens)

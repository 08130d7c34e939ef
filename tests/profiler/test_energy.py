import time

import pytest
import torch

from flextron.spec import Regime
from profiler.energy import energy_per_token


class CountingTelemetry:
    """NVML's cumulative energy counter (mJ) where every step costs `mj_per_step`."""

    def __init__(self, mj_per_step: float | None):
        self.total, self.mj_per_step, self.steps = 5000.0, mj_per_step, 0

    def energy_mj(self):
        return None if self.mj_per_step is None else self.total

    def step(self):
        self.steps += 1
        self.total += self.mj_per_step


@pytest.fixture
def no_cuda_sync(monkeypatch):
    """The counter stands in for the GPU; there is no device to wait for."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@pytest.mark.parametrize("regime, mj_per_token", [("prefill:b2:s3", 1.0), ("decode:b4:ctx64", 1.5)])
def test_energy_is_the_counter_delta_per_token(no_cuda_sync, regime, mj_per_token):
    """6 mJ a step: a prefill step of 2 x 3 tokens costs 1 mJ a token, a decode step of 4 x 1 1.5."""
    tele = CountingTelemetry(6.0)
    t0 = time.perf_counter()
    assert energy_per_token(tele, tele.step, Regime.parse(regime), 0.02) == pytest.approx(mj_per_token)
    # the span lasts at least the time asked for, in whole batches of steps between synchronisations
    assert time.perf_counter() - t0 >= 0.02 and tele.steps >= 10 and tele.steps % 10 == 0


def test_no_energy_counter_gives_none_without_running(no_cuda_sync):
    tele = CountingTelemetry(None)
    assert energy_per_token(tele, tele.step, Regime.parse("decode:b1:ctx64"), 0.02) is None
    assert tele.steps == 0

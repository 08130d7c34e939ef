import numpy as np
import pytest

from flextron.budget import Budget
from flextron.errors import FlextronError
from profiler.rounds import RoundsConfig, compliance, measure_in_rounds, noise_floor, per_round, summarise, tail_ratio


class FakeMachine:
    """Latency = true_ms[key] * drift(t) * (1 + jitter): the machine slows down as calls go on
    (`drift` per call, a slow ramp, plus `step` at each new round: a background job starting)."""

    def __init__(self, true_ms, drift=0.0, jitter=0.0, seed=0, step=0.0):
        self.true_ms, self.drift, self.jitter, self.step = true_ms, drift, jitter, step
        self.rng = np.random.default_rng(seed)
        self.calls, self.order = 0, []

    def measure(self, key, reps=3):
        self.order.append(key)
        out = []
        for _ in range(reps):
            self.calls += 1
            level = (1 + self.drift * self.calls) * (1 + self.step * ((len(self.order) - 1) // len(self.true_ms)))
            out.append(self.true_ms[key] * level * (1 + self.jitter * self.rng.standard_normal()))
        return out


TRUE = {"full": 10.0, "a": 7.0, "b": 5.0, "c": 8.5}


def test_rounds_shuffle_per_round_and_keep_their_round():
    m = FakeMachine(TRUE)
    rows = measure_in_rounds(list(TRUE), m.measure, rounds=5, seed=1)
    orders = [tuple(m.order[i * 4:(i + 1) * 4]) for i in range(5)]
    assert all(sorted(o) == sorted(TRUE) for o in orders)  # every config once per round
    assert len(set(orders)) > 1  # the order changes between rounds
    assert sorted({r["round"] for r in rows}) == [0, 1, 2, 3, 4] and len(rows) == 5 * 4 * 3


def test_ratio_to_full_cancels_drift():
    """A machine slowing down 3.5x over the session: absolute medians are far off, ratios are not."""
    m = FakeMachine(TRUE, drift=0.0005, step=0.5)
    s = summarise(measure_in_rounds(list(TRUE), m.measure, rounds=6), "full").set_index("key")
    assert s.loc["a", "latency_ms_median"] > 1.5 * TRUE["a"] and s.loc["a", "cv_rounds"] > 0.2
    for k in ("a", "b", "c"):
        assert s.loc[k, "ratio_to_full"] == pytest.approx(TRUE[k] / TRUE["full"], rel=0.05)
        assert s.loc[k, "ratio_to_full_hi"] - s.loc[k, "ratio_to_full_lo"] < 0.03  # tight: drift cancels per round


def test_noise_floor_recovers_known_jitter():
    """Per-sample jitter 10%, 3 samples a round, 10 rounds: each half's median over 5 round medians has
    a relative spread of about 0.1 * 1.25 / sqrt(3 * 5), so their difference ~ sqrt(2) times that."""
    floors = []
    for seed in range(6):
        m = FakeMachine({f"k{i}": 5.0 + i for i in range(12)} | {"full": 20.0}, jitter=0.10, seed=seed)
        rows = measure_in_rounds(list(m.true_ms), m.measure, rounds=10, seed=seed)
        floors.append(noise_floor(rows, "full")["noise_floor_pct"])
    expected = 100 * 0.10 * 1.2533 / np.sqrt(15) * np.sqrt(2) * 0.6745  # median of |N(0, sigma)|
    assert 0.5 * expected < np.median(floors) < 1.6 * expected
    quiet = FakeMachine(TRUE, jitter=0.001)
    assert noise_floor(measure_in_rounds(list(TRUE), quiet.measure, rounds=6), "full")["noise_floor_pct"] < 0.2


def test_compliance_with_confidence_and_quantiles_from_the_right_samples():
    def verdict(per_round_medians, frac):
        rows = [{"round": r, "key": k, "latency_ms": v} for r, m in enumerate(per_round_medians)
                for k, v in (("full", 10.0), ("x", 10.0 * m))]
        return compliance(*tail_ratio(rows, "x", "full", "p50"), frac)["verdict"]

    assert verdict([0.70, 0.71, 0.69, 0.70], 0.8) == "within"
    assert verdict([0.90, 0.91, 0.92, 0.90], 0.8) == "over"
    assert verdict([0.75, 0.85, 0.79, 0.82, 0.77], 0.8) == "uncertain"
    # p90 budgets use the tail of the per-step samples, pooled over rounds, not the median
    rows = [{"round": r, "key": k, "latency_ms": v} for r in range(6) for k, vals in
            {"full": [10] * 5, "x": [7, 7, 7, 7, 12]}.items() for v in vals]
    assert per_round(rows, "full").set_index("key").loc["x", "ratio_to_full"].iloc[0] == pytest.approx(0.7)
    p50, p90 = tail_ratio(rows, "x", "full", "p50"), tail_ratio(rows, "x", "full", "p90")
    assert p50[0] == pytest.approx(0.7) and p90[0] == pytest.approx(1.2)
    with pytest.raises(FlextronError, match="a p99 budget needs at least 100 samples"):
        tail_ratio(rows, "x", "full", "p99")


def test_rounds_and_budgets_refuse_bad_values():
    with pytest.raises(FlextronError, match="--rounds must be at least 2"):
        RoundsConfig(rounds=1)
    with pytest.raises(FlextronError, match="--quantile must be one of"):
        Budget("decode:b1:ctx8", 1.0, quantile="p95")
    with pytest.raises(FlextronError, match="--budget-frac must be a positive"):
        Budget.from_frac("decode:b1:ctx8", 0.0)
    b = Budget.from_frac("r", 0.8).resolve(50.0)
    assert (b.budget_ms, b.budget_frac, b.reference_full_ms) == (40.0, 0.8, 50.0)
    assert Budget.from_ms("r", 40.0).resolve(50.0).budget_frac == 0.8

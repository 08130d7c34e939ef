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


def test_round_spread_recovers_how_far_a_round_strays_and_the_first_look_margin_follows():
    """One sample a round, the full model exact and each config's 5% jitter: a round's ratio strays 5% from
    its config's, read from 6 rounds of 40 configs. The margin of a max-of-6 bound is Blom's normal score
    of the 6th of 6 (1.28) times the spread; of 18 rounds' 14th (the 98.3% bound), 0.66."""
    from profiler.rounds import first_look_margin, round_spread

    true = {"full": 10.0} | {f"k{i}": 5.0 + i / 10 for i in range(40)}
    m = FakeMachine(true, seed=3)
    rows = []
    for r in range(6):  # as few as verify's first rounds: no estimate of each config's centre biases it
        rows.append({"key": "full", "round": r, "latency_ms": 10.0})
        rows += [{"key": k, "round": r, "latency_ms": v * (1 + 0.05 * m.rng.standard_normal())}
                 for k, v in true.items() if k != "full"]
    assert round_spread(rows, "full") == pytest.approx(0.05, rel=0.1)
    assert round_spread([r for r in rows if r["round"] < 3 and r["key"] in ("full", "k0")], "full") is None  # 3 values
    assert first_look_margin(0.05, 6, 0.95) == pytest.approx(0.05 * 1.2816, rel=1e-3)
    assert first_look_margin(0.05, 18, 1 - 0.05 / 3) == pytest.approx(0.05 * 0.6638, rel=1e-3)


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


class PerKeyJitter(FakeMachine):
    """Each key its own per-sample jitter (a config whose steps vary more than its neighbours')."""

    def __init__(self, true_ms, jitter: dict, seed=0):
        super().__init__(true_ms, seed=seed)
        self.key_jitter = jitter

    def measure(self, key, reps=3):
        self.order.append(key)
        self.calls += reps
        return [self.true_ms[key] * (1 + self.key_jitter[key] * self.rng.standard_normal()) for _ in range(reps)]


def test_refine_adds_rounds_only_where_the_ratio_is_not_pinned_down():
    """Rounds go to the configs whose split-half ratio error is above the target (the noisy ones), beside
    the full model; settled configs get none; it stops at the target or at --max-rounds and says which."""
    from profiler.rounds import Precision, per_round, refine

    true = {"full": 10.0} | {f"q{i}": 5.0 + i / 10 for i in range(6)} | {f"n{i}": 6.0 + i / 10 for i in range(6)}
    jitter = {k: (0.25 if k.startswith("n") else 0.001) for k in true} | {"full": 0.001}
    m = PerKeyJitter(true, jitter, seed=3)
    rows = measure_in_rounds(list(true), m.measure, rounds=4, seed=3)
    before = noise_floor(rows, "full")["ratio_noise_floor_pct"]
    out, rec = refine(rows, m.measure, "full", Precision(target_floor_pct=0.5, max_rounds=10, max_seconds=1e9))
    counts = per_round(out, "full").groupby("key")["round"].nunique()
    assert all(counts[f"q{i}"] == 4 for i in range(6))  # settled after 4 rounds: nothing added
    assert counts["full"] == 4 + rec["rounds_added"] and rec["rounds_added"] > 0
    assert rec["configs_refined"] <= 6 and all(counts[f"n{i}"] <= 10 for i in range(6))
    assert rec["floor_before_pct"] == before and rec["floor_reached_pct"] == noise_floor(out, "full")[
        "ratio_noise_floor_pct"]
    assert (rec["stop"] == "target") == (rec["floor_reached_pct"] <= 0.5)
    assert rec["stop"] in ("target", "max_rounds")
    # already within the target: not a round more
    quiet = PerKeyJitter(true, {k: 0.001 for k in true})
    rows = measure_in_rounds(list(true), quiet.measure, rounds=4)
    out, rec = refine(rows, quiet.measure, "full", Precision(5.0, 10, 1e9))
    assert len(out) == len(rows) and rec["rounds_added"] == 0 and rec["stop"] == "target"


def test_refine_stops_at_the_time_cap_and_says_so():
    from profiler.rounds import Precision, refine

    true = {"full": 10.0, "a": 5.0, "b": 6.0, "c": 7.0}
    m = PerKeyJitter(true, {k: 0.3 for k in true}, seed=1)
    rows = measure_in_rounds(list(true), m.measure, rounds=4, seed=1)
    start = m.calls
    clock = lambda: (m.calls - start) * 0.01  # noqa: E731 - 10 ms a timed step, on the fake machine's count
    out, rec = refine(rows, m.measure, "full", Precision(0.01, 40, 0.05), clock=clock)
    assert rec["stop"] == "time_cap" and rec["rounds_added"] == 2  # one batch started before the cap, none after
    assert len(out) > len(rows)


def test_precision_refuses_bad_values():
    from profiler.rounds import Precision
    from profiler.sweep import ProfileConfig

    for bad in (dict(target_floor_pct=0.0), dict(target_floor_pct=-1.0), dict(max_seconds=0.0),
                dict(max_rounds=1), dict(target_floor_pct=float("nan"))):
        with pytest.raises(FlextronError, match="--" + next(iter(bad)).replace("_", "-")):
            Precision(**{"target_floor_pct": 5.0, "max_rounds": 12, "max_seconds": 60.0, **bad})
    with pytest.raises(FlextronError, match="--max-rounds"):
        ProfileConfig(run="r", rounds=6, max_rounds=4)
    with pytest.raises(FlextronError, match="--target-floor-pct"):
        ProfileConfig(run="r", target_floor_pct=0)

"""Interleaved rounds: how every end-to-end comparison is measured, and the statistics over them.

A machine drifts (clocks, other processes, thermal state) on the scale of seconds to minutes, so a
config measured at one moment and another config a minute later differ by more than their widths
do (a 2-core CPU read the same anchor cell at 0.34-1.09 ms within one sweep). So configs are never
measured one after another: in each of R rounds every config, the full model (the reference)
included, is measured once in a freshly shuffled order. Raw samples keep their round. Each config
gets its latency relative to the full model *in the same round* (`ratio_to_full`), in which the
drift cancels; statistics are taken over rounds; the test-retest error of two halves of the rounds
is the noise floor every model error is compared with; and "within budget" is decided from bounds
over rounds with a stated confidence (exact order statistics of the round medians for p50, a
bootstrap for the tails).

Engine-agnostic and torch-free: a measurement is any callable `key -> list of ms samples`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from flextron.errors import FlextronError

CONFIDENCE = 0.95  # one-sided confidence of a compliance decision
N_BOOT = 2000


@dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 6  # each config is measured once per round, in a fresh random order
    reps: int = 5  # timed calls per config per round (after the timer's warm-up)

    def __post_init__(self):
        from flextron.rundir import check_finite

        for name in ("rounds", "reps"):
            check_finite(name, getattr(self, name), whole=True)
        if self.rounds < 2:
            raise FlextronError("--rounds must be at least 2 (statistics and the noise floor are taken over rounds), "
                                f"got {self.rounds}")
        if self.reps < 1:
            raise FlextronError(f"--reps must be at least 1, got {self.reps}")


def measure_in_rounds(keys: list[str], measure: Callable[[str], list[float]], rounds: int, seed: int = 0,
                      first_round: int = 0, on_round: Callable[[list[dict]], None] | None = None,
                      progress=None, desc: str = "rounds", monitor=None, log: list | None = None,
                      max_repeats: int | None = None) -> list[dict]:
    """Measure every key once per round, in a freshly shuffled order each round.

    Returns raw rows `{"round", "order", "key", "sample", "latency_ms"}`. `on_round(rows)` is called
    with each finished round's rows (to write them as it goes); `first_round` resumes numbering.

    With a `monitor` (profiler/interference.py CpuMonitor), each row also carries the round's
    `steal_pct` and `other_pct`, and a round whose interference is far above the typical level of the
    accepted rounds in `log` (the session's, kept across calls) is measured again, at most
    `max_repeats` times per call (default: a third of the rounds, at least 1); `log` gets one entry per
    round measured, `rejected` for the ones measured again.
    """
    keys = list(dict.fromkeys(keys))
    out: list[dict] = []
    log = [] if log is None else log
    repeats_left = max(1, rounds // 3) if max_repeats is None else max_repeats
    bar = progress(total=rounds * len(keys), desc=desc) if progress else None
    r = first_round
    while r < first_round + rounds:
        order = keys[:]
        random.Random(seed * 1_000_003 + r).shuffle(order)
        this_round = []
        if monitor is not None:
            monitor.start()
        for i, key in enumerate(order):
            samples = [float(s) for s in measure(key)]
            if not samples or not all(math.isfinite(s) and s > 0 for s in samples):
                raise FlextronError(f"measuring {key} gave unusable samples {samples[:5]}; "
                                    "raise the timer's repetitions")
            this_round += [{"round": r, "order": i, "key": key, "sample": j, "latency_ms": s}
                           for j, s in enumerate(samples)]
            if bar:
                bar.update(1)
        seen = monitor.stop() if monitor is not None else None
        if seen is not None:
            accepted = [e for e in log if not e["rejected"]]
            rejected = repeats_left > 0 and monitor.flag(accepted, seen)
            log.append({"round": r, **seen, "rejected": rejected})
            if rejected:  # a burst: this round's samples are dropped and the round measured again
                repeats_left -= 1
                if bar:
                    bar.total += len(keys)
                continue
            this_round = [{**row, **seen} for row in this_round]
        out += this_round
        if on_round:
            on_round(this_round)
        r += 1
    if bar:
        bar.close()
    return out


def normalised(samples, reference: str):
    """Every raw sample with `ratio`: its latency over the reference's median in the same round."""
    import pandas as pd

    df = pd.DataFrame(samples) if not isinstance(samples, pd.DataFrame) else samples
    ref = df[df["key"] == reference].groupby("round")["latency_ms"].median()
    if ref.empty:
        raise FlextronError(f"the reference {reference!r} was not measured in these rounds")
    df = df[df["round"].isin(ref.index)]
    return df.assign(ratio=df["latency_ms"] / df["round"].map(ref))


def per_round(samples, reference: str):
    """One row per (key, round): the round's median and tail quantiles, and each over the reference's
    median in the same round (`ratio_to_full`, `ratio_p90`, `ratio_p99`). A round holds a few samples
    per config: its own tail quantiles are rough; `tail_ratio` pools rounds for tail budgets."""
    import pandas as pd

    df = normalised(samples, reference)
    g = df.groupby(["key", "round"])
    rt = pd.DataFrame({"median_ms": g["latency_ms"].median(), "p90_ms": g["latency_ms"].quantile(0.9),
                       "p99_ms": g["latency_ms"].quantile(0.99), "n": g.size(),
                       "ratio_to_full": g["ratio"].median(), "ratio_p90": g["ratio"].quantile(0.9),
                       "ratio_p99": g["ratio"].quantile(0.99)}).reset_index()
    return rt


def median_bounds(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """One-sided lower and upper `confidence` bounds of the median of the distribution `values` (one per
    round) were drawn from, from their order statistics: exact whatever that distribution is (the count
    of values below the median is Binomial(n, 1/2)), where a bootstrap of 6-18 rounds is over-confident.
    With too few rounds for the level the bounds are the extremes (of n, the largest covers the median
    with probability 1 - 2^-n)."""
    from scipy.stats import binom

    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    if n == 0:
        return float("nan"), float("nan")
    # the upper bound is the k-th smallest, k the least with P(Binomial(n, 1/2) >= k) <= 1 - confidence
    k = next((k for k in range(1, n + 1) if binom.sf(k - 1, n, 0.5) <= 1 - confidence), n)
    return float(v[n - k]), float(v[k - 1])


def continuation_power(values, n: int, limit: float, confidence: float = CONFIDENCE, seed: int = 0,
                       boots: int = 400) -> float:
    """The chance that measuring up to `n` rounds would put the upper `confidence` bound of the median
    (`median_bounds`) at or under `limit`: the share of bootstrap continuations (the rounds so far,
    `values`, plus n - len(values) rounds resampled from them) whose bound is. A pick whose chance is
    small is not worth its remaining rounds; stopping it never declares anything within."""
    v = np.asarray(values, dtype=float)
    extra = n - len(v)
    if extra <= 0 or len(v) == 0:
        return float(median_bounds(v, confidence)[1] <= limit) if len(v) else 0.0
    rng = np.random.default_rng(seed)
    # the bound is an order statistic whose position depends only on n: the bound of 0..n-1 is that position
    idx = int(median_bounds(np.arange(n, dtype=float), confidence)[1])
    draws = np.concatenate([np.broadcast_to(v, (boots, len(v))), rng.choice(v, size=(boots, extra))], axis=1)
    return float((np.sort(draws, axis=1)[:, idx] <= limit).mean())


def round_spread(samples, reference: str, min_values: int = 12) -> float | None:
    """How far one round's `ratio_to_full` strays from its config's typical ratio, as a share: from every pair
    of rounds of the same config, the median of |log ratio_i - log ratio_j| times 1.4826 / sqrt(2) (the
    standard deviation, were the rounds normal), pooled over the configs measured in at least 3 rounds.
    Pairs need no estimate of each config's own centre, which at 6 rounds would read about a fifth low.
    None with fewer than `min_values` pairs."""
    rt = per_round(samples, reference)
    diffs = []
    for k, g in rt.groupby("key")["ratio_to_full"]:
        if k == reference or len(g) < 3:
            continue
        v = np.log(g.to_numpy(dtype=float))
        i, j = np.triu_indices(len(v), 1)
        diffs.append(np.abs(v[i] - v[j]))
    d = np.concatenate(diffs) if diffs else np.empty(0)
    if len(d) < min_values:
        return None
    return float(1.4826 / math.sqrt(2) * np.median(d))


def first_look_margin(spread: float, rounds: int, confidence: float) -> float:
    """The share by which a p50 upper bound (`median_bounds`, at `confidence`) over `rounds` rounds is
    expected to sit above the ratio's median when each round strays by `spread` (`round_spread`): the
    bound is an order statistic, whose normal score (Blom's approximation) times the spread is the margin.
    A config whose ratio sits this far under its limit is bound within at that look about half of the time."""
    from scipy.stats import norm

    idx = int(median_bounds(np.arange(rounds, dtype=float), confidence)[1])  # the bound's position, 0-based
    return float(norm.ppf((idx + 1 - 0.375) / (rounds + 0.25)) * spread)


RATIO_COLUMN = {"p50": "ratio_to_full", "p90": "ratio_p90", "p99": "ratio_p99"}
QUANTILE = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
MIN_TAIL_SAMPLES = {"p50": 1, "p90": 20, "p99": 100}  # samples a quantile needs to be more than the maximum


def tail_ratio(samples, key: str, reference: str, quantile: str, seed: int = 0,
               confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(estimate, lower, upper bound) of `key`'s `quantile` step latency over the reference's median,
    from every sample of every round (each over its own round's reference): the median of per-round
    medians for p50; for p90/p99 the quantile of the pooled samples, bootstrapped over rounds."""
    df = normalised(samples, reference)
    mine = df[df["key"] == key]
    by_round = [g["ratio"].to_numpy() for _, g in mine.groupby("round")]
    if quantile == "p50":
        med = np.array([np.median(r) for r in by_round])
        return (float(np.median(med)), *median_bounds(med, confidence))
    n = sum(len(r) for r in by_round)
    if n < MIN_TAIL_SAMPLES[quantile]:
        raise FlextronError(f"a {quantile} budget needs at least {MIN_TAIL_SAMPLES[quantile]} samples per config, "
                            f"these rounds hold {n}; raise --rounds or --reps")
    q = QUANTILE[quantile]
    rng = np.random.default_rng(seed)
    boots = [np.quantile(np.concatenate([by_round[i] for i in rng.integers(0, len(by_round), len(by_round))]), q)
             for _ in range(N_BOOT // 4)]
    est = float(np.quantile(np.concatenate(by_round), q))
    return est, float(np.quantile(boots, 1 - confidence)), float(np.quantile(boots, confidence))


def summarise(samples, reference: str, seed: int = 0):
    """One row per key: latency statistics over all samples and rounds, `ratio_to_full` (median
    over rounds) and the tail ratios (pooled over rounds, see `tail_ratio`) with their bootstrap
    bounds (NaN for a tail with too few samples to estimate)."""
    import pandas as pd

    df = pd.DataFrame(samples) if not isinstance(samples, pd.DataFrame) else samples
    rt = per_round(df, reference)
    rows = []
    for key, g in rt.groupby("key"):
        s = df[df["key"] == key]["latency_ms"].to_numpy()
        med_rounds = g["median_ms"].to_numpy()
        row = {"key": key, "rounds": int(len(g)), "n": int(len(s)),
               "latency_ms_median": float(np.median(med_rounds)),
               "latency_ms_p10": float(np.quantile(s, 0.10)), "latency_ms_p50": float(np.quantile(s, 0.50)),
               "latency_ms_p90": float(np.quantile(s, 0.90)), "latency_ms_p99": float(np.quantile(s, 0.99)),
               "latency_ms_mean": float(s.mean()),
               "cv_rounds": float(med_rounds.std() / med_rounds.mean()) if len(med_rounds) > 1 else 0.0,
               "cv": float(s.std() / s.mean())}
        for q, col in RATIO_COLUMN.items():
            try:
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = tail_ratio(df, key, reference, q, seed=seed)
            except FlextronError:  # too few samples for this tail
                row[col] = row[f"{col}_lo"] = row[f"{col}_hi"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def split_half_errors(samples, reference: str, column: str = "ratio_to_full", rt=None):
    """Per key, its test-retest error in percent: the rounds split into two halves (alternating, so both
    halves span the whole session), the key's median `column` (of `per_round`) over each half, and
    |a - b| / mean(a, b). Keys measured in one half only are left out; for ratios, so is the reference
    (1 by construction)."""
    rt = per_round(samples, reference) if rt is None else rt
    rounds = sorted(rt["round"].unique())
    if len(rounds) < 2:
        raise FlextronError("the noise floor needs at least 2 rounds")
    half = {r: i % 2 for i, r in enumerate(rounds)}
    m = rt.assign(half=rt["round"].map(half)).groupby(["key", "half"])[column].median().unstack("half")
    m = m.reindex(columns=[0, 1]).dropna()
    if column != "median_ms":
        m = m.drop(index=reference, errors="ignore")
    return 100 * (m[0] - m[1]).abs() / ((m[0] + m[1]) / 2)


def noise_floor(samples, reference: str) -> dict:
    """Test-retest error of this measurement: the median over keys of `split_half_errors`, in percent.
    For absolute medians and for `ratio_to_full` (None when no key but the reference was measured in
    both halves)."""
    rt = per_round(samples, reference)
    out = {}
    for name, col in (("noise_floor_pct", "median_ms"), ("ratio_noise_floor_pct", "ratio_to_full")):
        err = split_half_errors(samples, reference, col, rt)
        out[name] = round(float(err.median()), 3) if len(err) else None  # nothing but the reference measured
    out["rounds"] = int(rt["round"].nunique())
    return out


# The profile's defaults: a 3% target reached its floor on a 2-core VM but fitted no better a latency model,
# 35-63 s slower (docs/results.md, session 12)
TARGET_FLOOR_PCT, MAX_ROUNDS, MAX_SECONDS = 5.0, 12, 120.0
REFINE_STOPS = {"target": "target reached", "max_rounds": "stopped at --max-rounds",
                "time_cap": "the time cap (--max-seconds) stopped it first"}


def describe_refine(rec: dict) -> str:
    """One line of what `refine` did: the floor it reached against its target, the rounds and time it
    spent, and why it stopped."""
    return (f"ratio noise floor {rec['floor_reached_pct']}% (target {rec['target_floor_pct']:g}%, "
            f"{rec['floor_before_pct']}% before); {rec['rounds_added']} rounds added for {rec['configs_refined']} "
            f"configs in {rec['seconds']:g} s; {REFINE_STOPS.get(rec['stop'], rec['stop'])}")


@dataclass(frozen=True)
class Precision:
    """How far `refine` measures: until the ratio noise floor is at most `target_floor_pct`, no config
    past `max_rounds` rounds, and no new batch of rounds started after `max_seconds`."""

    target_floor_pct: float
    max_rounds: int
    max_seconds: float

    def __post_init__(self):
        from flextron.rundir import check_finite

        check_finite("target_floor_pct", self.target_floor_pct, low=0, low_inclusive=False)
        check_finite("max_rounds", self.max_rounds, low=2, whole=True)
        check_finite("max_seconds", self.max_seconds, low=0, low_inclusive=False)


def refine(rows: list[dict], measure: Callable[[str], list[float]], reference: str, precision: Precision,
           seed: int = 0, on_round: Callable[[list[dict]], None] | None = None, progress=None,
           desc: str = "more rounds", monitor=None, log: list | None = None, clock=None) -> tuple[list[dict], dict]:
    """Add interleaved rounds where they change the answer: while the ratio noise floor of `rows` (raw
    rows of `measure_in_rounds`, `reference` among their keys) is above the target, the configs whose
    own split-half ratio error is above it (their ratio is not pinned down yet) get two more rounds
    (one per half) beside the reference; settled configs get none. Stops at the target, when no
    unsettled config has rounds left under `max_rounds`, or at the time cap (checked before each
    batch; `clock` is `time.perf_counter` unless a test passes a fake). Returns (all rows, a record:
    the floor before and after, rounds and configs added, seconds, and why it stopped)."""
    import time

    clock = clock or time.perf_counter
    t0, rows = clock(), list(rows)
    before = noise_floor(rows, reference)["ratio_noise_floor_pct"]
    added, refined = 0, set()
    while True:
        rt = per_round(rows, reference)
        errors = split_half_errors(rows, reference, rt=rt)
        if not len(errors) or errors.median() <= precision.target_floor_pct:
            stop = "target"
            break
        counts = rt.groupby("key")["round"].nunique()
        todo = [k for k, e in errors.items() if e > precision.target_floor_pct
                and counts.get(k, 0) + 2 <= precision.max_rounds]
        if not todo:
            stop = "max_rounds"
            break
        if clock() - t0 >= precision.max_seconds:
            stop = "time_cap"
            break
        first = max(r["round"] for r in rows) + 1
        rows += measure_in_rounds(todo + [reference], measure, 2, seed=seed, first_round=first, on_round=on_round,
                                  progress=progress, desc=desc, monitor=monitor, log=log)
        added += 2
        refined.update(todo)
    after = noise_floor(rows, reference)["ratio_noise_floor_pct"]
    return rows, {"target_floor_pct": precision.target_floor_pct, "floor_before_pct": before,
                  "floor_reached_pct": after, "rounds_added": added, "configs_refined": len(refined),
                  "seconds": round(clock() - t0, 1), "stop": stop}


def compliance(ratio: float, lo: float, hi: float, budget_frac: float, confidence: float = CONFIDENCE) -> dict:
    """Whether a config is within `budget_frac` of the full model, from its ratio's bounds: `within`
    when the upper bound is at or below the budget, `over` when the lower bound is above it, and
    `uncertain` when the interval straddles it (measure more rounds, then decide)."""
    verdict = "within" if hi <= budget_frac else "over" if lo > budget_frac else "uncertain"
    return {"verdict": verdict, "ratio": ratio, "ratio_lo": lo, "ratio_hi": hi, "confidence": confidence}

"""`flextron verify`: measure chosen configs end to end on the device, with confidence; replace misses.

Measured latency, not predicted, is what the lookup and the reports quote. Every search result
(`RUN/search/<regime>/<weights>/best.json`) is verified in interleaved rounds (`profiler/rounds.py`):
in each round the full model and every pick are measured once in a fresh random order, so each gets
its latency relative to the full model in the same round. The uniform configs (the lookup's
fallbacks) are measured the same way where a budget ends with nothing within (`--uniform`). A
budget is a fraction of this session's full model (`flextron.budget`); a pick is
`within` when the upper bound of its ratio at the budget's quantile (`profiler.rounds.tail_ratio`:
order statistics of the round medians for p50, a bootstrap over rounds for p90/p99) is within the
fraction, `over` when the lower bound is above it, and `uncertain` otherwise. Uncertain picks whose
estimate is within get more rounds (up to `--max-rounds`), the 5% error spent over those looks
(`look_confidence`), all of them in the same rounds; a pick still not `within` is replaced by the next
best config evaluated for the same regime and weights, for its budget or for another one and predicted
no slower than its own candidates, that is measured `within` (`--max-replacements`, `--max-seconds`);
those the latency model predicts within after this session's correction (how it measured the configs
decided so far against their prediction) are tried first. Candidates go in waves that share their rounds
(each round measures the full model once for all of them): the first holds every pick and, below a p50
pick the noise may keep from being bound within, its budget's best candidates expected to be by their last
look and at their first (each about half of the time; placed by how far a round strays: the profile's
rounds, then this session's); each later wave, every budget still missing its next candidate and the
same rungs below it, and every budget whose row is within its best-loss better candidate that this
session's own spread expects to be bound within by its last look (rungs placed by a noisier profile may
sit far under the budget). A budget's row is its best-loss candidate measured within; a candidate stops
getting rounds once one as good is within.
The budget a row keeps is the one searched (`budget_ms`, `budget_frac`, `reference_full_ms`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass

from flextron.errors import FlextronError
from flextron.spec import Regime, SubnetConfig

VERIFIED_FILE = "verified.parquet"
UNIFORM_FILE = "uniform.parquet"  # the uniform configs measured in the same session as the picks
SAMPLES_FILE = "samples.parquet"  # every raw sample, with its round
# Every evaluated candidate of a budget may be tried (a search evaluates 12 by default): the knapsack's
# picks sit near the budget, where a model error of a few % decides, so the next best often measures within.
MAX_REPLACEMENTS = 12


@dataclass(frozen=True)
class VerifyConfig:
    run: str  #: the run directory (searched)
    device: str = "auto"  #: the profiled device: cpu, cuda, cuda:N, or auto (CUDA when present, and says so)
    rounds: int = 6  #: interleaved rounds over every pick, the full model and the uniform configs
    max_rounds: int = 18  #: rounds a pick inside the noise band may get before it is decided
    #: p50: a pick inside the noise band gets no more rounds once fewer than this share of bootstrap continuations
    #: to --max-rounds would be declared within (profiler.rounds.continuation_power); 0: it gets every round
    futility: float = 0.1
    reps: int = 5  #: timed steps per config per round
    #: untimed steps before each config's timed ones in a round, besides the one that fills its cache; -1: the
    #: engine's and device's default (profiler.timer.default_e2e_warmup: none for torch on the CPU, else one)
    warmup: int = -1
    #: p50 | p90 | p99 of per-step latency a budget bounds; empty: the one each pick was searched for
    quantile: str = ""
    tolerance: float = 0.0  #: a pick may exceed its budget fraction by this share (0.02 = 2%)
    threads: int = 0  #: CPU: torch intra-op threads while measuring; 0 = one (steady on small, shared CPUs)
    #: candidates of a budget measured besides its pick: its rungs beside the pick in the first rounds, then, while
    #: nothing is within, the next ones (then the uniform fallback)
    max_replacements: int = MAX_REPLACEMENTS
    #: CPU (Linux): pin the measuring process to this core (the one pinned to is recorded in noise.json); -2: the
    #: last core it may use when measuring on one thread (steadier: benchmarks/pinning.py), else not pinned;
    #: -1: not pinned
    pin_core: int = -2
    #: time cap (s): past it, no more rounds are added to decide picks and no more replacements tried
    #: (undecided picks fall back; a wave of replacements started before it gets its first rounds); the
    #: stage says when the cap was hit before the decisions were made
    max_seconds: float = 600.0
    #: the uniform configs (the lookup's fallbacks) measured beside the picks: `needed` only when some budget
    #: of the regime has no pick or replacement measured within it (a budget's uniform seeds are among its
    #: replacements anyway); `all`: always
    uniform: str = "needed"

    def __post_init__(self):
        from flextron.budget import check_quantile
        from flextron.devices import set_device_field
        from flextron.rundir import check_finite
        from profiler.rounds import RoundsConfig

        set_device_field(self)
        RoundsConfig(rounds=self.rounds, reps=self.reps)
        check_finite("max_rounds", self.max_rounds, low=self.rounds)
        check_finite("futility", self.futility, low=0, high=1)
        check_finite("warmup", self.warmup, low=-1, whole=True)
        check_finite("tolerance", self.tolerance, low=0, high=0.5)
        check_finite("threads", self.threads, low=0)
        check_finite("max_replacements", self.max_replacements, low=0, whole=True)
        check_finite("max_seconds", self.max_seconds, low=0, low_inclusive=False)
        check_finite("pin_core", self.pin_core, low=-2, whole=True)
        if self.quantile:
            check_quantile(self.quantile)
        if self.uniform not in ("needed", "all"):
            raise FlextronError(f"--uniform must be needed or all, got {self.uniform!r}")


def _best_files(run) -> list:
    search_dir = run.require("search")
    files = sorted(search_dir.glob("*/*/best.json"))
    if not files:
        raise FlextronError(f"{search_dir} holds no search results; run `flextron search --run {run.root} ...` first")
    return files


def verify(cfg: VerifyConfig) -> dict:
    """`flextron verify` (see the module docstring), pinned to `cfg.pin_core` while it measures."""
    from flextron.devices import pinned

    with pinned(cfg.pin_core, cfg.device, cfg.threads) as core:
        return _verify(cfg, core)


def _verify(cfg: VerifyConfig, core: int | None) -> dict:
    import sys

    import pandas as pd

    from flextron.budget import Budget
    from flextron.devices import check_device, set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import (
        RunDir,
        read_json,
        read_parquet,
        rebuild,
        save_stage_config,
        write_json_atomic,
        write_parquet_atomic,
    )
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import MIN_TAIL_SAMPLES, noise_floor, round_spread, summarise
    from profiler.telemetry import Telemetry
    from profiler.timer import default_e2e_warmup

    run = RunDir(cfg.run)
    best_files = _best_files(run)
    check_device(cfg.device)
    threads = set_cpu_threads(cfg.device, cfg.threads)
    device_name = Telemetry(cfg.device).device_name
    by_regime: dict[str, list] = {}
    for bf in best_files:
        best = read_json(bf, run.root)
        if best.get("device_name") != device_name:
            raise FlextronError(
                f"{bf} was searched for {best.get('device_name')!r} but this device is {device_name!r}; "
                "verify on the device that was profiled"
            )
        wname = best.get("weights", "elastic")
        if best.get("weights_tag", wname) != run.weights_tag(wname):
            print(
                f"flextron verify: skipping {bf}: it was searched on {wname} weights that `flextron train` has "
                "replaced since; search again to verify them",
                file=sys.stderr,
            )
            continue
        by_regime.setdefault(best["regime"], []).append((bf, best))
        for b in best["best"]:
            q = cfg.quantile or b.get("quantile", "p50")
            if cfg.rounds * cfg.reps < MIN_TAIL_SAMPLES[q]:  # refuse before measuring anything
                raise FlextronError(
                    f"{bf} holds a {q} budget: its quantile needs at least {MIN_TAIL_SAMPLES[q]} "
                    f"samples per config, --rounds {cfg.rounds} x --reps {cfg.reps} give "
                    f"{cfg.rounds * cfg.reps}; raise --reps"
                )
    # Latency depends on shapes, not on weight values: one-shot weights time every pick.
    elastic = ElasticModel.load(run.elastic)
    rows, uniform_rows, all_samples, noise, t0 = [], [], [], {}, time.perf_counter()
    deadline, capped = t0 + cfg.max_seconds, []  # where the time cap stopped a decision
    futile = 0  # configs left undecided because more rounds would almost surely not decide them
    evaluated_fallbacks = 0
    for regime_key, picks in sorted(by_regime.items()):
        regime = Regime.parse(regime_key)
        session = InterleavedSession(
            elastic,
            regime,
            cfg.device,
            cfg.reps,
            cfg.warmup if cfg.warmup >= 0 else default_e2e_warmup(cfg.device, regime.engine),
            seed=len(all_samples),
            threads=threads,
            source_gguf=run.source_gguf() if regime.engine == "llamacpp" else None,
        )
        spec = elastic.spec
        first = {s.key: s for s in spec.uniform_configs()} if cfg.uniform == "all" else {}
        budgets = []  # one per searched budget, in the order of the search results
        for bf, best in picks:
            trials_path = bf.with_name("trials.parquet")
            trials = read_parquet(trials_path, run.root) if trials_path.is_file() else None
            for b in best["best"]:
                # the search's Budget, resolved against this session's full model (measured in these rounds)
                frac = b.get("budget_frac") or b["budget_ms"] / b["reference_full_ms"]
                sub = spec.validate(SubnetConfig.from_dict(b["config"]))
                budgets.append({"best": best, "b": b, "trials": trials, "frac": frac,
                                "limit": frac * (1 + cfg.tolerance), "sub": sub, "orig": sub,
                                "quantile": cfg.quantile or b.get("quantile", "p50"),
                                "pred": b["predicted_latency_ms"], "loss": b["loss"], "source": b["source"],
                                "replaced": 0, "tried": {sub.key}, "done": trials is None, "st": None})
        # The first wave: every pick, and below each pick the noise may keep from being bound within, its
        # budget's best candidates expected to be by their last look and at their first (`_rungs`, from how far
        # the profile's rounds strayed): a few steps a round each, where a second wave would cost rounds of the
        # full model and of every undecided config again.
        spread = _profile_spread(run, regime.key, cfg.reps)
        wave = [(x, x["sub"], _Pick(x["b"])) for x in budgets]
        wave += _ladders(budgets, _margins(cfg, spread), cfg, deadline, capped, regime.key)
        session.run({**first, **{alt.key: alt for _, alt, _ in wave}}, cfg.rounds, progress)
        # how this session measures the latency model's picks against their prediction (measured ratio over
        # predicted, per config decided): replacements predicted within after it go first
        seen: dict = {}
        while wave:
            fresh = {alt.key: alt for _, alt, _ in wave  # one measured already (another budget's) is not again
                     if session.rounds_of.get(session.key_of(alt.key), 0) < cfg.rounds}
            if fresh:
                session.run(fresh, cfg.rounds)
            sts = _decide_all(session, [(alt, x["limit"], x["quantile"]) for x, alt, _ in wave], cfg, deadline,
                              capped, groups=[(id(x), c.loss) for x, _, c in wave])
            medians = session.ratios()  # the median ratio whatever a budget's quantile: what the model predicts
            for (x, alt, c), st in zip(wave, sts):
                futile += bool(st.get("futile"))
                seen[alt.key] = (medians[session.key_of(alt.key)]["ratio_to_full"]
                                 / (c.predicted_latency_ms / _reference(x["b"])))
                if x["st"] is None:  # the pick itself
                    x["st"] = st
                elif st["verdict"] == "within" and (x["st"]["verdict"] != "within" or c.loss < x["loss"]):
                    x.update(sub=alt, pred=c.predicted_latency_ms, loss=c.loss, st=st, source=c.source)
            # Misses are replaced in waves: each budget still without a config within tries its next candidate
            # (and its rungs below it, from how far this session's rounds stray), all of them in shared rounds.
            here = round_spread(session.samples, FULL)
            spread = spread if here is None else here
            wave = _next_wave(budgets, seen, cfg, deadline, capped, regime.key, _margins(cfg, spread))
        decided = []
        for x in budgets:
            best, sub = x["best"], x["sub"]
            decided.append((sub, x["quantile"], x["limit"], x["frac"], x["b"]["budget_ms"]))
            rows.append(
                {
                    "regime": regime.key,
                    "engine": regime.engine,
                    "device_name": device_name,
                    "weights": best.get("weights", "elastic"),
                    "weights_tag": best.get("weights_tag"),
                    "quality_setting": best.get("quality_setting"),  # the loss's split, corpus@id, windows
                    "quantile": x["quantile"],
                    "limit_frac": x["limit"],
                    "config": sub.to_json(),
                    "config_key": sub.key,
                    "predicted_latency_ms": x["pred"],
                    "loss": x["loss"],
                    "ppl": math.exp(x["loss"]),
                    "replacements_tried": x["replaced"],
                    "replaced": sub != x["orig"],
                    "source": x["source"],
                }
            )
        # Every pick's numbers from the session's final rounds: one measured full model for all rows. The
        # budget stays the one searched (its ms, fraction and reference), so `lookup --budget-ms X` at the
        # searched X finds its row; verify's own full model is `measured_full_ms`.
        reference = session.reference_ms()
        for row, (sub, quantile, limit, frac, searched) in zip(rows[len(rows) - len(decided) :], decided):
            st = session.stats(sub.key, quantile, limit, look_confidence(cfg))  # the level its looks were made at
            budget = Budget(regime.key, budget_ms=searched, budget_frac=frac, quantile=quantile).resolve(
                searched / frac)
            row.update(
                {
                    "budget_frac": budget.budget_frac,
                    "budget_ms": budget.budget_ms,
                    "reference_full_ms": budget.reference_full_ms,
                    "measured_full_ms": reference,
                    **{
                        k: st[k]
                        for k in (
                            "measured_latency_ms",
                            "latency_ms_p50",
                            "latency_ms_p90",
                            "latency_ms_p99",
                            "ratio",
                            "ratio_lo",
                            "ratio_hi",
                            "verdict",
                            "rounds",
                        )
                    },
                    "within_budget": st["verdict"] == "within",
                }
            )
        # by the final verdicts: a config shared by two budgets may have had rounds after one decided it
        missed = sum(not row["within_budget"] for row in rows[len(rows) - len(decided):])
        # The lookup's fallbacks, measured beside the same full model as the picks (ratios at every
        # quantile): every uniform config where a budget has nothing within (or with --uniform all), else
        # those tried as replacements.
        if missed and cfg.uniform != "all":
            session.run({s.key: s for s in spec.uniform_configs()}, cfg.rounds, progress)
        summary = summarise(session.samples, FULL).set_index("key")
        for sub in spec.uniform_configs():
            if session.key_of(sub.key) not in summary.index:
                continue
            s = summary.loc[session.key_of(sub.key)]
            uniform_rows.append(
                {
                    "regime": regime.key,
                    "device_name": device_name,
                    "config": sub.to_json(),
                    "config_key": sub.key,
                    "measured_latency_ms": s["latency_ms_median"],
                    **{c: s[c] for c in summary.columns if c.startswith(("latency_ms_p", "ratio_"))},
                    "reference_full_ms": reference,
                    "rounds": int(s["rounds"]),
                }
            )
        noise[regime.key] = {**noise_floor(session.samples, FULL), "interference": session.interference_summary(),
                             # the configs' measured ratio over the latency model's prediction, median and range
                             "measured_over_predicted": [round(statistics.median(seen.values()), 4),
                                                         round(min(seen.values()), 4), round(max(seen.values()), 4)]}
        all_samples += session.samples
        session.close()
        # A fallback the lookup may quote needs its loss on the picks' evaluation setting; a search
        # evaluates only some uniform configs, so two runs could otherwise quote different fallbacks.
        for bf, best in picks:
            limit = max(r["limit_frac"] for r in rows if r["regime"] == regime.key)
            compliant = [
                sub
                for sub in spec.uniform_configs()
                if session.key_of(sub.key) in summary.index
                and summary.loc[session.key_of(sub.key), "ratio_to_full_hi"] <= limit
            ]
            # the smallest sub-network's loss is the lookup's floor: nothing worse is ever served
            compliant += [spec.smallest()] if spec.smallest() not in compliant else []
            evaluated_fallbacks += _fallback_losses(run, bf, best, compliant, cfg.device)
    if not rows:
        raise FlextronError(
            "the search results hold no evaluated picks of the current weights to verify; "
            "run `flextron search` (with more --trials)"
        )
    df = pd.DataFrame(rows)
    with rebuild(run / "verify") as out:  # swapped in whole: picks, fallbacks and samples of one session
        write_parquet_atomic(df, out / VERIFIED_FILE)
        write_parquet_atomic(pd.DataFrame(uniform_rows), out / UNIFORM_FILE)
        write_parquet_atomic(pd.DataFrame(all_samples), out / SAMPLES_FILE)
        save_stage_config(out / "verify_config.json", cfg)
        write_json_atomic(out / "noise.json", {"device_name": device_name, "threads": threads, "pinned_core": core,
                                               "regimes": noise, "time_cap_hit": capped,
                                               "stopped_for_futility": futile})
    seconds = round(time.perf_counter() - t0, 1)
    floors = ", ".join(f"{k} {v['ratio_noise_floor_pct']:.2f}%" if v["ratio_noise_floor_pct"] is not None
                       else f"{k} n/a (only the full model was measured)" for k, v in noise.items())
    print(f"flextron verify: ratio noise floor reached {floors} in {seconds:.0f} s"
          + (f"; {futile} decision(s) left undecided early (more rounds would almost surely not have decided "
             f"them, --futility {cfg.futility:g})" if futile else "")
          + (f"; the time cap (--max-seconds {cfg.max_seconds:g}) stopped {len(capped)} decision(s) first"
             if capped else ""), file=sys.stderr)
    return {
        "device": device_name,
        "threads": threads,
        "verified": len(df),
        "within_budget": int(df["within_budget"].sum()),
        "verdicts": df["verdict"].value_counts().to_dict(),
        "replaced": int(df["replaced"].sum()),
        "uniform_measured": len(uniform_rows),
        "fallback_losses_evaluated": evaluated_fallbacks,
        "max_ratio_over_budget_frac": round(float((df["ratio"] / df["budget_frac"]).max()), 4),
        "noise_floor_pct": {k: v["noise_floor_pct"] for k, v in noise.items()},
        "ratio_noise_floor_pct": {k: v["ratio_noise_floor_pct"] for k, v in noise.items()},
        "interference": {k: v["interference"] for k, v in noise.items()},
        "time_cap_hit": capped,
        "stopped_for_futility": futile,
        "seconds": seconds,
    }


def _candidates(trials, b: dict):
    """(the evaluated configs a pick of budget `b` may be replaced by, the worst loss worth trying).

    Its own study's configs and those of every other budget of the same quantile that the latency model
    predicts no slower than the slowest of its own (a neighbouring budget's ladder adds rungs between this
    budget's; the losses compare: one search, one evaluation setting). A candidate worse than the budget's
    own uniform seeds is never worth its rounds: those seeds are candidates too, and the uniform fallbacks
    are measured where nothing within is found."""
    ok = trials["evaluated"].astype(bool)
    if "quantile" in trials.columns:  # a p50 and a p90 study may share a budget in ms
        ok &= trials["quantile"].fillna("p50") == b.get("quantile", "p50")
    own = trials[ok & (trials["budget_ms"] == b["budget_ms"])]
    if own.empty:
        return own, math.inf
    pool = trials[ok & (trials["predicted_latency_ms"] <= own["predicted_latency_ms"].max())]  # own included
    uni = own[own["source"] == "uniform"]["loss"] if "source" in own else []
    return pool.drop_duplicates("config"), (float(max(uni)) if len(uni) else math.inf)


class _Pick:
    """A searched pick in the shape of a trials row (what a wave's entries carry)."""

    def __init__(self, b: dict):
        self.predicted_latency_ms, self.loss, self.source = b["predicted_latency_ms"], b["loss"], b["source"]


def _profile_spread(run, regime_key: str, reps: int) -> float | None:
    """How far one of verify's rounds is expected to stray (`profiler.rounds.round_spread`), from the profile's
    end-to-end rounds of the regime, scaled from the profile's steps a round to `reps` (a round's median over
    fewer steps strays more); None when the profile kept no rounds of it."""
    import pandas as pd

    from flextron.spec import ElasticSpec
    from profiler.interleaved import FULL
    from profiler.rounds import round_spread

    path, conf = run / "profile" / "e2e_samples.parquet", run / "profile" / "profile_config.json"
    if not (path.is_file() and conf.is_file()):
        return None
    try:
        samples = pd.read_parquet(path)
        samples = samples[samples["regime"] == regime_key]
        full = ElasticSpec.load(run.elastic / "elastic_spec.json").full().key
        spread = round_spread(samples.assign(key=samples["key"].where(samples["key"] != full, FULL)), FULL)
        profile_reps = int(json.loads(conf.read_text())["reps"])
    except (FlextronError, KeyError, ValueError, OSError):  # an older or partial profile: no prior
        return None
    return None if spread is None else spread * math.sqrt(profile_reps / reps)


def _margins(cfg: "VerifyConfig", spread: float | None) -> tuple[float, ...]:
    """The shares by which a config's p50 bound is expected over its ratio at its last look (`max_rounds`) and
    at its first (`rounds`), when a round strays by `spread`, smaller first (none when that is unknown)."""
    from profiler.rounds import first_look_margin

    if spread is None:
        return ()
    conf = look_confidence(cfg)
    return tuple(sorted({first_look_margin(spread, n, conf) for n in (cfg.max_rounds, cfg.rounds)}))


def _cands(x: dict):
    if "cands" not in x:
        cands, worst = _candidates(x["trials"], x["b"])
        x["cands"] = cands[cands["loss"] <= worst]
    return x["cands"]


def _untried(x: dict, correction: float) -> list:
    return [c for c in _corrected_order(_cands(x), x["limit"], correction, _reference(x["b"])).itertuples()
            if SubnetConfig.from_json(c.config).key not in x["tried"]]


def _rungs(x: dict, head_ms: float, rows: list, correction: float, margins: tuple) -> list:
    """Below a budget's head candidate (predicted `head_ms`), the first of `rows` (`_corrected_order`) expected
    to be bound within by its last look, then the first expected to be at its first (each about half of the
    time: `first_look_margin`): each `margins` share under the limit after this session's `correction`, and
    each only where the candidate above it is not. The margins are p50 bounds': none for a tail budget."""
    if not margins or x["quantile"] != "p50":
        return []
    out, ratio = [], correction * head_ms / _reference(x["b"])
    for m in margins:
        if ratio * (1 + m) <= x["limit"]:
            continue  # the candidate above is expected within already
        c = next((c for c in rows if c not in out
                  and correction * c.predicted_latency_ms / _reference(x["b"]) * (1 + m) <= x["limit"]), None)
        if c is not None:
            out.append(c)
            ratio = correction * c.predicted_latency_ms / _reference(x["b"])
    return out


def _take(x: dict, c, wave: list, cfg: "VerifyConfig") -> None:
    if x["replaced"] >= cfg.max_replacements:
        return
    alt = SubnetConfig.from_json(c.config)
    x["tried"].add(alt.key)
    x["replaced"] += 1
    wave.append((x, alt, c))


def _ladders(budgets: list[dict], margins: tuple, cfg: "VerifyConfig", deadline: float, capped: list,
             regime_key: str) -> list[tuple]:
    """(budget, candidate, its trials row) for the first wave: beside each pick the noise may keep from being
    bound within, its budget's `_rungs` (nothing in this session is measured yet: no correction); none past
    `deadline` (noted in `capped`)."""
    wave = []
    for x in budgets:
        if x["done"] or not (rungs := _rungs(x, x["pred"], _untried(x, 1.0), 1.0, margins)):
            continue
        if time.perf_counter() >= deadline:
            capped.append(f"{regime_key} budget {x['frac']:.3g}: rungs")
            continue
        for c in rungs:
            _take(x, c, wave, cfg)
    return wave


def _next_wave(budgets: list[dict], seen: dict, cfg: VerifyConfig, deadline: float, capped: list,
               regime_key: str, margins: tuple = ()) -> list[tuple]:
    """(budget, candidate config, its trials row) for each budget that may still try one, under this session's
    correction so far (`seen`: measured over predicted ratio per config decided) and `margins` (`_margins` of
    its own spread): a budget with nothing within, its best candidate not tried yet in `_corrected_order` and
    its `_rungs` below it; a budget whose row is within, its best-loss untried candidate better than the row
    and expected to be bound within by its last look (a first wave placed by a noisier profile's rounds may
    have put its rungs far under the budget)."""
    wave = []
    correction = statistics.median(seen.values()) if len(seen) >= 2 else 1.0
    for x in budgets:
        within = x["st"]["verdict"] == "within"
        if x["done"] or (within and not margins):
            continue
        if x["replaced"] >= cfg.max_replacements:
            x["done"] = True
            continue
        rows = _untried(x, correction)
        if within:
            rows = [c for c in rows if c.loss < x["loss"] and x["quantile"] == "p50"
                    and correction * c.predicted_latency_ms / _reference(x["b"]) * (1 + margins[0]) <= x["limit"]]
        if not rows:
            x["done"] = x["done"] or not within
            continue
        if time.perf_counter() >= deadline:
            capped.append(f"{regime_key} budget {x['frac']:.3g}: replacements")
            x["done"] = True
            continue
        for c in [rows[0]] if within else [rows[0], *_rungs(x, rows[0].predicted_latency_ms, rows[1:], correction,
                                                                  margins)]:
            _take(x, c, wave, cfg)
    return wave


def _reference(b: dict) -> float:
    """The full model's step (ms) a searched budget `b` was a fraction of: its predictions over it are
    predicted ratios."""
    return b.get("reference_full_ms") or b["budget_ms"] / b["budget_frac"]


def _corrected_order(cands, limit: float, correction: float, reference_ms: float):
    """The replacement candidates in loss order, those whose predicted ratio times `correction` (how this
    session measures the latency model's picks: measured over predicted, median over the configs decided
    so far) is within `limit` first: a session that measures picks 4% over their prediction does not
    spend its rounds on every candidate the model put just under the budget."""
    import pandas as pd

    fits = correction * cands["predicted_latency_ms"] / reference_ms <= limit
    return pd.concat([cands[fits].sort_values("loss", kind="stable"), cands[~fits].sort_values("loss", kind="stable")])


def _fallback_losses(run, best_file, best: dict, compliant: list, device: str) -> int:
    """Evaluate (once, into the run's quality cache) the loss of each uniform config in `compliant`
    that the search of `best_file` never evaluated, on that search's own setting. Returns how many."""
    import sys

    from flextron.elastic import ElasticModel
    from flextron.rundir import read_json
    from search.quality import QUALITY_CACHE, QualityEvaluator, read_quality_cache

    cache = run / "search" / QUALITY_CACHE
    setting = best.get("quality_setting")
    config_path = best_file.with_name("search_config.json")
    if not setting or not config_path.is_file():
        print(f"flextron verify: {best_file} records no {'quality setting' if not setting else 'search_config.json'} "
              "(searched by an older flextron): the uniform fallbacks' losses were not evaluated, so the lookup "
              f"can quote only those the search evaluated; re-run `flextron search --run {run.root} --restart`",
              file=sys.stderr)
        return 0
    todo = [c for c in compliant if c.key not in read_quality_cache(cache, setting)]
    if not todo:
        return 0
    scfg = read_json(config_path, run.root)
    wname = best.get("weights", "elastic")
    # in the search's precision (float32 before it chose one)
    model = ElasticModel.load(run.weights(wname)[1], device=device, dtype=scfg.get("eval_dtype", "float32"))
    ev = QualityEvaluator(
        model,
        cache,
        scfg["eval_windows"],
        scfg["eval_seq_len"],
        corpus=run.corpus(scfg["corpus"]),
        tag=best.get("weights_tag", wname),
    )
    if ev.setting != setting:  # not the picks' setting (another corpus since?): their losses would not compare
        print(f"flextron verify: the picks of {best_file} were evaluated on {setting!r}, the run now evaluates on "
              f"{ev.setting!r} (the corpus changed?): the uniform fallbacks' losses were not evaluated; re-run "
              f"`flextron search --run {run.root} --restart`", file=sys.stderr)
        return 0
    for c in todo:
        ev.loss(c)
    return len(todo)


def look_confidence(cfg: VerifyConfig) -> float:
    """The one-sided confidence of each of verify's looks at a pick. A pick inside the noise band is
    looked at again after more rounds (up to `max_rounds`), and every look could declare it within: the
    error rate is spent over the looks (Bonferroni), so the chance that a pick exactly on its budget is
    declared within stays at most 1 - CONFIDENCE over all of them."""
    from profiler.rounds import CONFIDENCE

    looks = 1 + math.ceil(max(cfg.max_rounds - cfg.rounds, 0) / cfg.rounds)
    return 1 - (1 - CONFIDENCE) / looks


def _power(session, sub: SubnetConfig, limit: float, cfg: VerifyConfig, conf: float) -> float:
    """The chance that `sub`'s p50 bound would be within `limit` after `cfg.max_rounds` rounds, from
    its per-round ratios so far (profiler.rounds.continuation_power)."""
    from profiler.interleaved import FULL
    from profiler.rounds import continuation_power, per_round

    key = session.key_of(sub.key)
    rt = per_round([s for s in session.samples if s["key"] in (key, FULL)], FULL)
    return continuation_power(rt[rt["key"] == key]["ratio_to_full"].to_numpy(), cfg.max_rounds, limit, conf,
                              seed=session.seed)


def _decide(session, sub: SubnetConfig, limit: float, cfg: VerifyConfig, quantile: str,
            deadline: float = math.inf, capped: list | None = None) -> dict:
    """One pick's verdict against `limit`: `_decide_all` of it alone."""
    return _decide_all(session, [(sub, limit, quantile)], cfg, deadline, capped)[0]


def _decide_all(session, items: list, cfg: VerifyConfig, deadline: float = math.inf,
                capped: list | None = None, groups: list | None = None) -> list[dict]:
    """Each (config, limit, quantile)'s verdict against its limit (a fraction of the full model), measuring
    more rounds while it sits inside the noise band (until `deadline`, noted in `capped`): the undecided ones
    at the same round count share their rounds (one full model a round for all of them), `cfg.rounds` at a
    time, each look at `look_confidence(cfg)`. A config whose estimate is already over its limit gets no
    more rounds, nor (p50) one that more rounds would almost surely leave undecided (`cfg.futility`): it
    stays undecided, never within (stopping for futility only lowers the false-within rate). With `groups`
    ((group, loss) per item: a budget's candidates), an item gets no more rounds once another of its group
    with a loss no worse is within: its verdict would choose nothing."""
    conf = look_confidence(cfg)
    sts = [session.stats(sub.key, quantile, limit, conf) for sub, limit, quantile in items]
    open_ = list(range(len(items)))
    while open_:
        todo = {}
        for i in list(open_):
            (sub, limit, quantile), st = items[i], sts[i]
            if not (st["verdict"] == "uncertain" and st["ratio"] <= limit
                    and session.rounds_of[session.key_of(sub.key)] < cfg.max_rounds):
                open_.remove(i)
            elif groups and any(j != i and groups[j][0] == groups[i][0] and groups[j][1] <= groups[i][1]
                                and sts[j]["verdict"] == "within" for j in range(len(items))):
                open_.remove(i)  # moot: a config as good is within
            elif cfg.futility > 0 and quantile == "p50" and _power(session, sub, limit, cfg, conf) < cfg.futility:
                sts[i] = {**st, "futile": True}
                open_.remove(i)
            else:
                todo[sub.key] = sub
        if not todo:
            break
        if time.perf_counter() >= deadline:
            if capped is not None:
                capped += [f"{key[:24]}: rounds" for key in todo]
            break
        # the configs at the fewest rounds go together, so each keeps its own looks (every cfg.rounds rounds,
        # as look_confidence counts them); the others catch up or are decided first
        have = {k: session.rounds_of[session.key_of(k)] for k in todo}
        least = min(have.values())
        session.run({k: v for k, v in todo.items() if have[k] == least}, min(cfg.rounds, cfg.max_rounds - least))
        for i in open_:
            sub, limit, quantile = items[i]
            sts[i] = session.stats(sub.key, quantile, limit, conf)
    return sts

"""search/verify.py: picks measured in interleaved rounds against the full model."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from search_helpers import _budget, _fake_latency, _one_pick, _results, _search

from flextron.errors import FlextronError


def _straddling_pick(run, monkeypatch):
    """Make uniform(0.5) the only pick, at its parameter share of a 10 ms full model, and time it 15%
    below and 10% above that budget from call to call (its estimate stays within, its bound never
    does); everything else steady at its parameter share. Returns (pick, budget fraction)."""
    from flextron.elastic import ElasticModel

    spec = ElasticModel.load(run / "elastic").spec
    pick = spec.uniform(0.5)
    _search(run, budget_ms=(_budget(run, 0.9),))
    frac = pick.param_count(spec) / spec.full().param_count(spec)
    _one_pick(run, spec, pick, frac)
    _fake_latency(
        monkeypatch, spec, lambda f, n: [10.0 * f * (0.85 if n % 2 else 1.1) if abs(f - frac) < 1e-9 else 10.0 * f] * 3
    )
    return pick, frac


def test_verify_measures_more_rounds_inside_the_noise_band_and_never_accepts_a_straddle(run_copy, monkeypatch):
    from search.verify import VerifyConfig, verify

    pick, frac = _straddling_pick(run_copy, monkeypatch)
    verify(VerifyConfig(run=str(run_copy), rounds=2, max_rounds=6, reps=1, warmup=0, futility=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet").iloc[0]
    assert ver["verdict"] == "uncertain" and not ver["within_budget"] and ver["rounds"] > 2  # measured more
    assert ver["ratio_lo"] < frac < ver["ratio_hi"]
    from search.export import ExportConfig, export

    # the uniform configs measure steadily at their parameter share, so a smaller one serves the budget;
    # the straddling pick never does
    export(ExportConfig(run=str(run_copy), lookup=True))
    rows = json.loads((run_copy / "export" / "lookup.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["source"] == "uniform"
    assert all(r["config"] != pick.to_dict() and r["ratio_hi"] <= r["budget_frac"] for r in rows)


def test_the_time_cap_stops_adding_rounds_and_says_so(run_copy, monkeypatch, capsys):
    """Past --max-seconds no more rounds are added to decide a pick: it stays undecided (never within),
    the stage says the cap was hit first, and noise.json records where."""
    from search.verify import VerifyConfig, verify

    _straddling_pick(run_copy, monkeypatch)
    out = verify(VerifyConfig(run=str(run_copy), rounds=2, max_rounds=6, reps=1, warmup=0, max_seconds=1e-6, futility=0,
                              max_replacements=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet").iloc[0]
    assert ver["verdict"] == "uncertain" and ver["rounds"] == 2  # 6 without the cap (test above)
    assert out["time_cap_hit"] and "time cap (--max-seconds 1e-06) stopped" in capsys.readouterr().err
    assert json.loads((run_copy / "verify" / "noise.json").read_text())["time_cap_hit"] == out["time_cap_hit"]
    with pytest.raises(FlextronError, match="--max-seconds"):
        VerifyConfig(run=str(run_copy), max_seconds=0)


@pytest.mark.parametrize("quantile, verdict", [("p50", "within"), ("p90", "over")])
def test_quantile_budgets_use_the_tail_samples(run_copy, monkeypatch, quantile, verdict):
    """A pick whose median step fits but whose every fifth step is slow meets a p50 budget, not a p90 one."""
    from flextron.elastic import ElasticModel
    from search.verify import VerifyConfig, verify

    spec = ElasticModel.load(run_copy / "elastic").spec
    pick = spec.uniform(0.5)
    _search(run_copy, budget_ms=(_budget(run_copy, 0.9),))
    frac = pick.param_count(spec) / spec.full().param_count(spec)
    _one_pick(run_copy, spec, pick, frac * 1.05)
    _fake_latency(monkeypatch, spec, lambda f, n: [10.0 * f] * 4 + [10.0 * f * (2.0 if abs(f - frac) < 1e-9 else 1.0)])
    verify(VerifyConfig(run=str(run_copy), rounds=4, reps=5, warmup=0, quantile=quantile))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet").iloc[0]
    assert ver["verdict"] == verdict and ver["quantile"] == quantile


def _searched_on_a_fake_timer(run, monkeypatch, trials: int):
    """Search `run` at one budget, then time every config at its parameter share of a 10 ms full model.
    Returns (spec, results folder, trials, evaluated trials (one per config), {config: params}, full params)."""
    from flextron.elastic import ElasticModel
    from flextron.spec import SubnetConfig

    spec = ElasticModel.load(run / "elastic").spec
    _search(run, budget_ms=(_budget(run, 0.95),), trials=trials)
    _fake_latency(monkeypatch, spec)
    folder = _results(run)
    table = pd.read_parquet(folder / "trials.parquet")
    ev = table[table["evaluated"]].drop_duplicates("config")
    params = {c: spec.validate(SubnetConfig.from_json(c)).param_count(spec) for c in ev["config"]}
    return spec, folder, table, ev, params, spec.full().param_count(spec)


def test_verify_replaces_a_miss_with_a_config_that_fits(run_copy, monkeypatch):
    """A pick measured over its budget is replaced by the next best evaluated config of the same
    budget, regime and weights that measures within it."""
    from search.verify import VerifyConfig, verify

    spec, folder, trials, ev, params, full = _searched_on_a_fake_timer(run_copy, monkeypatch, 6)
    assert len(ev) >= 3
    best = json.loads((folder / "best.json").read_text())
    pick = max(params, key=params.get)  # make the largest evaluated config the pick, and let it miss
    budget = 10.0 * sorted(params.values())[-2] / full  # the second largest fits exactly
    trials.loc[trials["evaluated"], "budget_ms"] = budget
    # predicted as the fake timer measures (10 ms x share of the full model's parameters)
    trials["predicted_latency_ms"] = [10.0 * params[c] / full if c in params else p
                                      for c, p in zip(trials["config"], trials["predicted_latency_ms"])]
    trials.to_parquet(folder / "trials.parquet", index=False)
    best["best"] = [
        {
            **best["best"][0],
            "budget_ms": budget,
            "budget_frac": budget / 10.0,
            "reference_full_ms": 10.0,
            "config": json.loads(pick),
            "predicted_latency_ms": 10.0 * params[pick] / full,
            "loss": 0.0,
        }
    ]
    (folder / "best.json").write_text(json.dumps(best))
    v = verify(VerifyConfig(run=str(run_copy), rounds=2, reps=1, warmup=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet")
    assert v["replaced"] == 1 and bool(ver["replaced"].iloc[0]) and bool(ver["within_budget"].iloc[0])
    assert ver["config"].iloc[0] != pick and ver["replacements_tried"].iloc[0] >= 1
    assert ver["measured_latency_ms"].iloc[0] <= budget and ver["verdict"].iloc[0] == "within"


def test_verify_bad_flags_keep_earlier_results(run_copy):
    from search.verify import VerifyConfig, verify

    _search(run_copy, budget_ms=(_budget(run_copy, 0.9) * 3,))
    verify(VerifyConfig(run=str(run_copy), rounds=2, reps=2, warmup=1))
    before = (run_copy / "verify" / "verified.parquet").read_bytes()
    for kw, msg in [
        ({"rounds": 1}, "--rounds must be at least 2"),
        ({"reps": 0}, "--reps must be at least 1"),
        ({"tolerance": float("nan")}, "--tolerance"),
        ({"quantile": "p95"}, "--quantile must be one of"),
        ({"max_rounds": 3, "rounds": 4}, "--max-rounds must be >= 4"),
        ({"device": "gpu"}, "--device must be cpu"),
        ({"uniform": "some"}, "--uniform must be needed or all"),
    ]:
        with pytest.raises(FlextronError, match=msg):
            verify(VerifyConfig(run=str(run_copy), **kw))
    assert (run_copy / "verify" / "verified.parquet").read_bytes() == before


def test_picks_of_replaced_trained_weights_are_never_verified_or_resumed(run_copy, capsys):
    """`flextron train` rewrote trained/ after a search: its picks, losses and studies are stale."""
    import os
    import shutil

    from search.verify import VerifyConfig, verify

    shutil.copytree(run_copy / "elastic", run_copy / "trained")
    b = _budget(run_copy, 2.0)
    _search(run_copy, budget_ms=(b,), weights="trained")
    for f in (run_copy / "trained").glob("*.safetensors"):  # as a new training run's weights would be
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(FlextronError, match="no evaluated picks of the current weights"):
        verify(VerifyConfig(run=str(run_copy), rounds=2, reps=1, warmup=0))
    assert "replaced since" in capsys.readouterr().err
    with pytest.raises(FlextronError, match="re-trained weights"):
        _search(run_copy, budget_ms=(b,), weights="trained")


class _OnBudget:
    """An InterleavedSession whose pick sits exactly on its budget: each round's ratio to the full model
    is `frac` times a noise factor whose median is 1 (10% spread per config), one sample per round."""

    def __init__(self, frac: float, seed: int):
        import numpy as np

        from profiler.interleaved import FULL, InterleavedSession

        self.session = object.__new__(InterleavedSession)
        self.session.samples, self.session.rounds_of, self.session.seed = [], {}, seed
        self.session.full_key = "the full config"
        self.session.run = self.run
        self.rng, self.frac, self.full = np.random.default_rng(seed), frac, FULL

    def run(self, subs, rounds, progress=None):
        first = self.session.rounds_of.get(self.full, 0)
        for r in range(first, first + rounds):
            self.session.samples += [
                {"key": self.full, "round": r, "latency_ms": 100 * float(self.rng.lognormal(0, 0.1))},
                {"key": "pick", "round": r, "latency_ms": 100 * self.frac * float(self.rng.lognormal(0, 0.1))}]
        for k in (self.full, "pick"):
            self.session.rounds_of[k] = self.session.rounds_of.get(k, 0) + rounds


def test_verify_keeps_its_confidence_over_repeated_looks(monkeypatch):
    """A pick exactly on its budget is looked at after 6, 12 and 18 rounds (each look may declare it
    within): over many simulated sessions it is declared within at most 5% of the time, the level
    verify states. The same looks at the plain 95% level each are the over-confident ones."""
    from types import SimpleNamespace

    import search.verify as v

    cfg = v.VerifyConfig(run="unused", rounds=6, max_rounds=18)
    spend = v.look_confidence
    assert spend(cfg) == pytest.approx(1 - 0.05 / 3)

    def false_within_rate(conf, n=400):
        monkeypatch.setattr(v, "look_confidence", conf)
        within = 0
        for seed in range(n):
            sim = _OnBudget(0.8, seed)
            sim.run({}, cfg.rounds)
            within += v._decide(sim.session, SimpleNamespace(key="pick"), 0.8, cfg, "p50")["verdict"] == "within"
        return within / n

    spent, naive = false_within_rate(spend), false_within_rate(lambda cfg: 0.95)
    print(f"false within: {spent:.3f} spent over the looks, {naive:.3f} at 95% each")
    assert spent <= 0.05, spent
    assert naive > spent


class _Alternating(_OnBudget):
    """Per-round ratios alternating 15% below and 10% above `frac` (estimate within, bound never)."""

    def run(self, subs, rounds, progress=None):
        first = self.session.rounds_of.get(self.full, 0)
        for r in range(first, first + rounds):
            self.session.samples += [{"key": self.full, "round": r, "latency_ms": 100.0},
                                     {"key": "pick", "round": r, "latency_ms": 100 * self.frac * (0.85, 1.1)[r % 2]}]
        for k in (self.full, "pick"):
            self.session.rounds_of[k] = self.session.rounds_of.get(k, 0) + rounds


class _Cycled(_OnBudget):
    """Per-round ratios to the full model read in turn from `ratios` (times `frac`)."""

    ratios = (1.0,)

    def run(self, subs, rounds, progress=None):
        first = self.session.rounds_of.get(self.full, 0)
        for r in range(first, first + rounds):
            self.session.samples += [{"key": self.full, "round": r, "latency_ms": 100.0},
                                     {"key": "pick", "round": r,
                                      "latency_ms": 100 * self.frac * self.ratios[r % len(self.ratios)]}]
        for k in (self.full, "pick"):
            self.session.rounds_of[k] = self.session.rounds_of.get(k, 0) + rounds


def test_a_pick_inside_the_noise_band_gets_every_round_and_one_over_its_budget_no_more():
    from types import SimpleNamespace

    import search.verify as v

    cfg = v.VerifyConfig(run="unused", rounds=2, max_rounds=6, futility=0)
    sim = _Alternating(0.8, 0)
    sim.run({}, cfg.rounds)
    st = v._decide(sim.session, SimpleNamespace(key="pick"), 0.8, cfg, "p50")
    assert st["verdict"] == "uncertain" and st["rounds"] == 6 and st["ratio_lo"] < 0.8 < st["ratio_hi"]
    # with the futility stop: half its rounds 10% over, no number of rounds would bound it within: it stops
    hopeless = _Alternating(0.8, 0)
    hopeless.run({}, cfg.rounds)
    st = v._decide(hopeless.session, SimpleNamespace(key="pick"), 0.8, replace(cfg, futility=0.1), "p50")
    assert st["verdict"] == "uncertain" and st["rounds"] == 2 and st["futile"]
    # one slow round in six: more rounds would likely bound it within, so it gets them (and is within)
    likely = _Cycled(0.8, 0)
    likely.ratios = (0.95, 1.02, 0.95, 0.96, 0.94, 0.95)
    cfg6 = v.VerifyConfig(run="unused", rounds=6, max_rounds=18)
    likely.run({}, cfg6.rounds)
    st = v._decide(likely.session, SimpleNamespace(key="pick"), 0.8, cfg6, "p50")
    assert st["verdict"] == "within" and st["rounds"] == 18 and not st.get("futile")
    over = _Alternating(0.8 * 1.2, 0)  # its estimate is over the limit: stopping early never accepts it
    over.run({}, cfg.rounds)
    st = v._decide(over.session, SimpleNamespace(key="pick"), 0.8, cfg, "p50")
    assert st["verdict"] != "within" and st["rounds"] == 2



def test_replacement_candidates_include_neighbouring_budgets_predicted_no_slower():
    """A pick's replacements: its own study's evaluated configs plus any other budget's (same quantile)
    predicted no slower than the slowest of its own; never an unevaluated one or another quantile's; the
    worst loss worth trying is its own uniform seeds'."""
    from search.verify import _candidates

    rows = [  # (budget_ms, quantile, config, predicted ms, evaluated, source, loss)
        (10.0, "p50", "a", 9.9, True, "knapsack_stretch", 2.0),
        (10.0, "p50", "b", 9.0, True, "knapsack", 3.0),
        (10.0, "p50", "u", 8.0, True, "uniform", 5.0),
        (8.0, "p50", "c", 7.5, True, "knapsack_stretch", 3.5),  # a lower budget's rung: a candidate
        (8.0, "p50", "u2", 6.0, True, "uniform", 7.0),
        (12.0, "p50", "d", 11.0, True, "knapsack", 1.0),  # predicted slower than every own candidate: not one
        (12.0, "p50", "e", 9.5, True, "knapsack", 2.5),  # a higher budget's, predicted within: a candidate
        (8.0, "p90", "f", 7.0, True, "knapsack", 1.5),  # another quantile
        (8.0, "p50", "g", 7.0, False, "search", 1.2),  # never evaluated
    ]
    trials = pd.DataFrame(rows, columns=["budget_ms", "quantile", "config", "predicted_latency_ms", "evaluated",
                                         "source", "loss"])
    cands, worst = _candidates(trials, {"budget_ms": 10.0, "quantile": "p50"})
    assert sorted(cands["config"]) == ["a", "b", "c", "e", "u", "u2"] and worst == 5.0
    assert sorted(cands[cands["loss"] <= worst]["config"]) == ["a", "b", "c", "e", "u"]
    none, inf = _candidates(trials, {"budget_ms": 9.0, "quantile": "p50"})
    assert none.empty and inf == float("inf")


def test_replacements_the_session_would_measure_within_go_first():
    """In loss order, but a candidate whose predicted ratio times the session's correction (its picks
    measured 5% over prediction) is over the limit waits behind every one that fits after it."""
    from search.verify import _corrected_order

    cands = pd.DataFrame({"config": list("abcd"), "loss": [1.0, 2.0, 3.0, 4.0],
                          "predicted_latency_ms": [79.0, 74.0, 78.0, 70.0]})  # of a 100 ms full model
    assert list(_corrected_order(cands, 0.8, 1.0, 100.0)["config"]) == list("abcd")
    assert list(_corrected_order(cands, 0.8, 1.05, 100.0)["config"]) == list("bdac")  # 79, 78 -> 83, 82: later
    assert list(_corrected_order(cands, 0.8, 0.9, 100.0)["config"]) == list("abcd")


def test_misses_of_several_budgets_are_replaced_in_shared_rounds(run_copy, monkeypatch):
    """Two budgets whose picks miss each try their next candidate in the same wave: both candidates share
    the wave's rounds (one full model a round), so the session runs its first rounds and one wave, not
    one set of rounds per replacement; a candidate already measured (another budget's pick) is not
    measured again from scratch. (No rungs below the picks: the profile's spread is not known here.)"""
    import search.verify as v
    from flextron.spec import SubnetConfig
    from search.verify import VerifyConfig, verify

    monkeypatch.setattr(v, "_profile_spread", lambda *a: None)
    spec, folder, _, ev, params, full = _searched_on_a_fake_timer(run_copy, monkeypatch, 8)
    sizes = sorted(set(params.values()))
    assert len(sizes) >= 3
    by_size = {params[c]: c for c in params}
    # predicted as the fake timer measures; the larger the better, so budget A's best candidate is B's pick
    # (no uniform seeds: no candidate is too bad to try)
    ev = ev.assign(predicted_latency_ms=[10.0 * params[c] / full for c in ev["config"]],
                   loss=[-float(params[c]) for c in ev["config"]], source="search")
    best = json.loads((folder / "best.json").read_text())
    rows, entries = [], []
    for size, pick in ((sizes[-2], by_size[sizes[-1]]), (sizes[-3], by_size[sizes[-2]])):  # each pick one size over
        budget = 10.0 * size / full
        rows.append(ev.assign(budget_ms=budget, budget_frac=budget / 10.0))
        entries.append({**best["best"][0], "budget_ms": budget, "budget_frac": budget / 10.0, "reference_full_ms": 10.0,
                        "config": json.loads(pick), "predicted_latency_ms": 10.0 * params[pick] / full, "loss": 0.0})
    pd.concat(rows).to_parquet(folder / "trials.parquet", index=False)
    (folder / "best.json").write_text(json.dumps({**best, "best": entries}))
    v = verify(VerifyConfig(run=str(run_copy), rounds=2, reps=1, warmup=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet")
    assert v["replaced"] == 2 and ver["within_budget"].all() and (ver["replacements_tried"] == 1).all()
    samples = pd.read_parquet(run_copy / "verify" / "samples.parquet")
    assert samples[samples["key"] == "full"]["round"].nunique() == 4  # 2 first rounds + 1 shared wave of 2
    shared = SubnetConfig.from_json(by_size[sizes[-2]])  # B's pick, then A's replacement: measured once
    assert ver["config"].iloc[0] == shared.to_json()
    assert samples[samples["key"] == shared.key]["round"].nunique() == 2  # its first rounds serve the wave too


def test_a_pick_the_noise_may_miss_has_its_rungs_measured_in_the_first_rounds(run_copy, monkeypatch):
    """With rounds straying 5% (the profile's spread), a pick predicted on its budget is measured beside its
    budget's best candidate likely to be bound within by its last look and the best likely within at its
    first, in the same first rounds: the pick measures over, the better rung within, and no second wave
    runs. The row is the best-loss candidate within."""
    import search.verify as v
    from flextron.spec import SubnetConfig
    from profiler.rounds import first_look_margin

    monkeypatch.setattr(v, "_profile_spread", lambda *a: 0.05)
    spec, folder, _, ev, params, full = _searched_on_a_fake_timer(run_copy, monkeypatch, 8)
    sizes = sorted(set(params.values()))
    by_size = {params[c]: c for c in params}
    cfg = v.VerifyConfig(run=str(run_copy), rounds=6, reps=1, warmup=0, max_rounds=18)
    last, first = (first_look_margin(0.05, n, v.look_confidence(cfg)) for n in (18, 6))
    limit = sizes[-1] / full / (1 + last / 2)  # the largest (the pick) measures over; the rungs lie below
    mid = next(s for s in reversed(sizes) if s / full * (1 + last) <= limit)
    low = next(s for s in reversed(sizes) if s / full * (1 + first) <= limit)
    assert mid > low, "the spec's configs are too coarse for two distinct rungs"
    ev = ev.assign(predicted_latency_ms=[10.0 * params[c] / full for c in ev["config"]],
                   loss=[-float(params[c]) for c in ev["config"]], source="search", budget_ms=10.0 * limit,
                   budget_frac=limit)
    ev.to_parquet(folder / "trials.parquet", index=False)
    best = json.loads((folder / "best.json").read_text())
    pick = by_size[sizes[-1]]
    (folder / "best.json").write_text(json.dumps({**best, "best": [{
        **best["best"][0], "budget_ms": 10.0 * limit, "budget_frac": limit, "reference_full_ms": 10.0,
        "config": json.loads(pick), "predicted_latency_ms": 10.0 * sizes[-1] / full, "loss": -float(sizes[-1])}]}))
    out = v.verify(cfg)
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet")
    samples = pd.read_parquet(run_copy / "verify" / "samples.parquet")
    assert out["replaced"] == 1 and ver["within_budget"].all() and ver["replacements_tried"].iloc[0] == 2
    assert ver["config"].iloc[0] == SubnetConfig.from_json(by_size[mid]).to_json()
    assert samples[samples["key"] == "full"]["round"].nunique() == 6  # one wave: the first rounds
    measured = set(samples["key"]) - {"full"}
    assert measured == {SubnetConfig.from_json(by_size[s]).key for s in (sizes[-1], mid, low)}


def test_a_candidate_stops_getting_rounds_once_one_as_good_is_within():
    """Of one budget's two candidates, the better-loss one within stops the worse, still uncertain, from
    getting its extra rounds; the worse one within does not stop the better."""
    from types import SimpleNamespace

    import search.verify as v

    cfg = v.VerifyConfig(run="unused", rounds=6, max_rounds=18)
    items = [(SimpleNamespace(key=k), 0.8, "p50") for k in ("a", "b")]

    class _Settled(_Two):  # "a" is bound within at its first look; "b" needs 18 rounds
        cycles = {"a": (0.9,) * 6, "b": _Two.cycles["b"]}

    for losses, b_rounds in (((1.0, 2.0), 6), ((2.0, 1.0), 18)):
        sim = _Settled(0.8, 0)
        sim.run({"a": None, "b": None}, cfg.rounds)
        sts = v._decide_all(sim.session, items, cfg, groups=[("x", loss) for loss in losses])
        assert sts[0]["verdict"] == "within" and sts[1]["rounds"] == b_rounds
    sim = _Settled(0.8, 0)
    sim.run({"a": None, "b": None}, cfg.rounds)
    assert v._decide_all(sim.session, items, cfg, groups=[("x", 1.0), ("y", 2.0)])[1]["rounds"] == 18  # other budget


class _Two(_OnBudget):
    """Two picks, each round's ratio read in turn from its own cycle (times `frac`); records each run's keys."""

    cycles = {"a": (0.95, 1.02, 0.95, 0.96, 0.94, 0.95), "b": (0.96, 0.95, 1.03, 0.95, 0.94, 0.95)}

    def run(self, subs, rounds, progress=None):
        self.calls = getattr(self, "calls", []) + [sorted(subs)]
        first = self.session.rounds_of.get(self.full, 0)
        for r in range(first, first + rounds):
            self.session.samples.append({"key": self.full, "round": r, "latency_ms": 100.0})
            self.session.samples += [{"key": k, "round": r, "latency_ms": 100 * self.frac * self.cycles[k][r % 6]}
                                     for k in subs]
        for k in (self.full, *subs):
            self.session.rounds_of[k] = self.session.rounds_of.get(k, 0) + rounds


def test_picks_inside_the_noise_band_share_their_extra_rounds():
    """Two picks that each need 18 rounds to be bound within get their extra rounds together: 18 rounds
    of the full model in all, not 6 + 12 + 12."""
    from types import SimpleNamespace

    import search.verify as v

    cfg = v.VerifyConfig(run="unused", rounds=6, max_rounds=18)
    sim = _Two(0.8, 0)
    sim.run({"a": None, "b": None}, cfg.rounds)
    sts = v._decide_all(sim.session, [(SimpleNamespace(key=k), 0.8, "p50") for k in ("a", "b")], cfg)
    assert [st["verdict"] for st in sts] == ["within", "within"] and [st["rounds"] for st in sts] == [18, 18]
    assert sim.calls == [["a", "b"]] * 3 and sim.session.rounds_of["full"] == 18


def test_a_wave_past_the_time_cap_tries_nothing_and_names_only_budgets_with_a_candidate_left():
    import math

    import search.verify as v
    from flextron.spec import SubnetConfig

    a, b = SubnetConfig((64, 64), (2, 2)), SubnetConfig((32, 32), (2, 2))
    trials = pd.DataFrame({"evaluated": [True, True], "budget_ms": [10.0, 10.0], "predicted_latency_ms": [9.0, 8.0],
                           "config": [a.to_json(), b.to_json()], "loss": [1.0, 2.0], "source": ["search", "search"]})
    budget = {"budget_ms": 10.0, "budget_frac": 0.5, "reference_full_ms": 20.0}

    def budgets():
        def one(tried):
            return {"b": budget, "trials": trials, "frac": 0.5, "limit": 0.5, "st": {"verdict": "over"},
                    "replaced": 0, "tried": set(tried), "done": False}
        return [one({a.key}), one({a.key, b.key})]  # the first has b left to try, the second nothing

    cfg = v.VerifyConfig(run="unused")
    capped: list = []
    assert v._next_wave(budgets(), {}, cfg, 0.0, capped, "R") == [] and capped == ["R budget 0.5: replacements"]
    capped = []
    wave = v._next_wave(xs := budgets(), {}, cfg, math.inf, capped, "R")
    assert [alt for _, alt, _ in wave] == [b] and not capped
    assert xs[0]["replaced"] == 1 and b.key in xs[0]["tried"] and xs[1]["done"]


def test_the_profiles_rounds_give_verify_its_prior_spread(tmp_path):
    """How far the profile's rounds strayed, scaled from its steps a round to verify's (a median of fewer
    steps strays more), for the regime asked; none without the profile's rounds or its settings."""
    import math

    from flextron.rundir import RunDir
    from flextron.spec import ElasticSpec
    from profiler.rounds import round_spread
    from search.verify import _profile_spread

    spec = ElasticSpec.build("llama", 2, 64, 256, 4, 2, 16, 320)
    (tmp_path / "elastic").mkdir()
    spec.save(tmp_path / "elastic" / "elastic_spec.json")
    run = RunDir(tmp_path)
    assert _profile_spread(run, "R", 5) is None
    rng = np.random.default_rng(0)
    rows = []
    for r in range(8):
        rows.append({"key": spec.full().key, "round": r, "latency_ms": 10.0, "regime": "R"})
        rows += [{"key": f"c{i}", "round": r, "latency_ms": 6.0 + i + rng.normal(0, 0.3), "regime": "R"}
                 for i in range(3)]
        rows.append({"key": "c0", "round": r, "latency_ms": 50.0 * (1 + r % 2), "regime": "other"})
    (tmp_path / "profile").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "profile" / "e2e_samples.parquet")
    assert _profile_spread(run, "R", 5) is None  # no settings saved beside the rounds
    (tmp_path / "profile" / "profile_config.json").write_text(json.dumps({"reps": 3}))
    mine = pd.DataFrame([r for r in rows if r["regime"] == "R"]).replace({spec.full().key: "full"})
    assert _profile_spread(run, "R", 5) == pytest.approx(round_spread(mine, "full") * math.sqrt(3 / 5))
    assert _profile_spread(run, "R", 3) == pytest.approx(round_spread(mine, "full"))


def test_rungs_follow_the_margins_the_cap_and_the_quantile():
    """Below a head candidate predicted on its limit, a wave adds the first candidate under the limit by the
    last-look margin and the first under it by the first-look margin; none where the head is under them
    already, none for a p90 budget, none without a spread, never past --max-replacements; the first wave's
    rungs stop at the time cap, which names the budget."""
    import math

    import search.verify as v
    from flextron.spec import SubnetConfig
    from profiler.rounds import first_look_margin

    cfgs = [SubnetConfig((w, w), (2, 2)) for w in (64, 56, 48, 40, 32)]
    pred = [10.0, 9.7, 9.4, 9.0, 8.0]  # of a 20 ms full model: ratios 0.5, 0.485, 0.47, 0.45, 0.4
    trials = pd.DataFrame({"evaluated": [True] * 5, "budget_ms": [10.0] * 5, "predicted_latency_ms": pred,
                           "config": [c.to_json() for c in cfgs], "loss": [1.0, 2.0, 3.0, 4.0, 5.0],
                           "source": ["search"] * 5})
    budget = {"budget_ms": 10.0, "budget_frac": 0.5, "reference_full_ms": 20.0}

    def one(quantile="p50", head=0):
        return {"b": budget, "trials": trials, "frac": 0.5, "limit": 0.5, "st": {"verdict": "over"}, "replaced": 0,
                "tried": {cfgs[head].key}, "done": False, "quantile": quantile, "pred": pred[head]}

    cfg = v.VerifyConfig(run="unused")
    margins = (0.05, 0.1)  # 0.5 / 1.05 = 0.476, 0.5 / 1.1 = 0.4545
    assert v._margins(cfg, None) == () and v._margins(cfg, 0.05) == pytest.approx(
        sorted(first_look_margin(0.05, n, v.look_confidence(cfg)) for n in (18, 6)))
    wave = v._ladders([x := one()], margins, cfg, math.inf, capped := [], "R")
    assert [alt for _, alt, _ in wave] == [cfgs[2], cfgs[3]] and x["replaced"] == 2 and not capped
    assert v._ladders([one(head=3)], margins, cfg, math.inf, [], "R") == []  # 0.45: under both already
    assert v._ladders([one("p90")], margins, cfg, math.inf, [], "R") == []
    assert [alt for _, alt, _ in v._ladders([one()], margins, replace(cfg, max_replacements=1), math.inf, [], "R")] \
        == [cfgs[2]]
    assert v._ladders([one()], margins, cfg, 0.0, capped, "R") == [] and capped == ["R budget 0.5: rungs"]
    # a later wave: the next candidate (0.485), then the rungs below it
    wave = v._next_wave([one()], {}, cfg, math.inf, [], "R", margins)
    assert [alt for _, alt, _ in wave] == [cfgs[1], cfgs[2], cfgs[3]]
    assert [alt for _, alt, _ in v._next_wave([one()], {}, cfg, math.inf, [], "R")] == [cfgs[1]]  # no spread
    # a row within (a low rung): its best untried better candidate the session's spread expects within, alone
    row = {**one(), "st": {"verdict": "within"}, "loss": 4.0, "tried": {cfgs[0].key, cfgs[3].key}}
    assert [alt for _, alt, _ in v._next_wave([row], {}, cfg, math.inf, [], "R", margins)] == [cfgs[2]]
    assert v._next_wave([{**row, "tried": set(row["tried"])}], {}, cfg, math.inf, [], "R") == []  # no spread
    assert v._next_wave([{**row, "tried": set(row["tried"]), "quantile": "p90"}], {}, cfg, math.inf, [], "R",
                        margins) == []

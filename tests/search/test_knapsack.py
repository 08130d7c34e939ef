import itertools

import numpy as np
import pytest

from flextron.quality_model import QualityModel, QualityTable
from flextron.spec import ElasticSpec, SubnetConfig
from profiler.latency_model import LatencyModel, encode
from search.knapsack import (
    LayerTables,
    best_under_budget,
    budget_seeds,
    deep_target,
    ladder,
    picks_at,
    repair,
    seeds,
    sparse_penalties,
)


def _models(num_layers=3, seed=0):
    spec = ElasticSpec.build("llama", num_layers, 64, 512, 8, 4, 16, 320, mlp_choices=3, head_choices=2)
    rng = np.random.default_rng(seed)
    attn = {l: {h: 0.02 * h + rng.uniform(0, 0.02) for h in spec.head_counts[l]} for l in range(num_layers)}
    mlp = {l: {w: 0.0004 * w + rng.uniform(0, 0.02) for w in spec.mlp_widths[l]} for l in range(num_layers)}
    whole = {l: attn[l][8] + mlp[l][512] + 0.03 for l in range(num_layers)}
    lat = LatencyModel(attn, mlp, 0.1, layer_table=whole, alphas=(None,), forms=("scaled",))
    configs = spec.uniform_configs() + [spec.depth([l]) for l in range(num_layers)]
    sums = lat._sums(encode(configs))
    lat.fit(encode(configs), 0.5 + sums[:, 0] + sums[:, 1])
    mlp_d = tuple(tuple(sorted(rng.uniform(0, 0.5, len(ws)), reverse=True)[:-1]) + (0.0,) for ws in spec.mlp_widths)
    heads_d = tuple(tuple(sorted(rng.uniform(0, 0.4, len(hs)), reverse=True)[:-1]) + (0.0,) for hs in spec.head_counts)
    table = QualityTable(3.0, mlp_d, heads_d, tuple(rng.uniform(0.1, 1.5, num_layers)))
    return spec, lat, QualityModel(table, spec)


def _everything(spec):
    return [spec.canonical(SubnetConfig(w, h, [l for l in range(spec.num_layers) if s[l]]))
            for w in itertools.product(*spec.mlp_widths) for h in itertools.product(*spec.head_counts)
            for s in itertools.product((0, 1), repeat=spec.num_layers) if not all(s)]


def test_the_knapsack_finds_the_best_predicted_config_under_every_budget_exactly():
    spec, lat, qm = _models()
    tables = LayerTables.build(lat, qm, spec)
    every = list(dict.fromkeys(_everything(spec)))
    ms, loss = lat.predict(encode(every)), qm.predict(every)
    lo, hi = lat.range_ms(spec)
    for frac in np.linspace(0.0, 1.0, 13):
        budget = lo + frac * (hi - lo)
        got = best_under_budget(tables, budget, bins=20000)
        fits = ms <= budget + 1e-12
        assert got is not None and lat.predict_config(got) <= budget + 1e-9
        # the rounding of latencies to budget/bins steps may only cost a config within one step of the budget
        inner = fits & (ms <= budget - 3 * (budget - lo) / 20000 - 1e-12)
        if inner.any():
            assert qm.predict_config(got) <= loss[inner].min() + 1e-9
    for budget in np.linspace(lo, hi, 41):  # coarse steps: rounding latencies up keeps every answer within budget
        coarse = best_under_budget(tables, budget, bins=10)
        assert coarse is None or lat.predict_config(coarse) <= budget + 1e-9
    assert best_under_budget(tables, lo - 1e-3) is None
    depth_only = best_under_budget(tables, hi * 0.8, "depth")
    assert depth_only.is_uniform() and depth_only.mlp_width == spec.full().mlp_width and depth_only.skip
    width_only = best_under_budget(tables, hi * 0.8, "width")
    assert width_only.skip == ()
    seeded = seeds(tables, hi * 0.8, 3)
    assert seeded[0] == ("knapsack", best_under_budget(tables, hi * 0.8))
    assert {s for s, _ in seeded} <= {"knapsack", "knapsack_sparse", "knapsack_depth", "knapsack_width"}
    assert len({c for _, c in seeded}) == len(seeded) and all(lat.predict_config(c) <= hi * 0.8 for _, c in seeded)


def test_a_cut_penalty_finds_the_best_config_with_fewer_cut_layers_exactly():
    """Each layer whose widths are cut (neither full nor skipped) costs `cut_penalty` more predicted loss:
    the knapsack's answer minimises loss + penalty x cut layers exactly (checked against every config),
    so the sparse picks concentrate cuts where a whole-layer skip or full width would otherwise lose."""
    spec, lat, qm = _models(seed=2)
    tables = LayerTables.build(lat, qm, spec)
    every = list(dict.fromkeys(_everything(spec)))
    ms, loss = lat.predict(encode(every)), qm.predict(every)
    full = spec.full()

    def cuts(c):
        return sum(1 for l in range(spec.num_layers) if l not in c.skip
                   and (c.mlp_width[l], c.heads[l]) != (full.mlp_width[l], full.heads[l]))

    n_cut = np.array([cuts(c) for c in every])
    lo, hi = lat.range_ms(spec)
    penalties = sparse_penalties(tables)
    assert len(penalties) == 2 and 0 < penalties[0] < penalties[1]
    fewer = 0
    for budget in np.linspace(lo + 0.2 * (hi - lo), hi, 9):
        plain = best_under_budget(tables, budget, bins=20000)
        for p in penalties + (10.0,):
            got = best_under_budget(tables, budget, bins=20000, cut_penalty=p)
            assert lat.predict_config(got) <= budget + 1e-9
            inner = ms <= budget - 3 * (budget - lo) / 20000 - 1e-12
            objective = loss + p * n_cut
            assert qm.predict_config(got) + p * cuts(got) <= objective[inner].min() + 1e-9
            assert cuts(got) <= cuts(plain)
            fewer += cuts(got) < cuts(plain)
    assert fewer  # the penalty changed some answer, not only kept it
    sources = [s for s, _ in picks_at(tables, lo + 0.5 * (hi - lo))]
    assert sources[0] == "knapsack" and set(sources) <= {"knapsack", "knapsack_sparse", "knapsack_depth",
                                                           "knapsack_width"}


def test_repair_makes_a_proposal_fit_by_the_cheapest_cuts():
    spec, lat, qm = _models(num_layers=4, seed=1)
    tables = LayerTables.build(lat, qm, spec)
    lo, hi = lat.range_ms(spec)
    budget = lo + 0.4 * (hi - lo)
    fixed = repair(tables, spec.full(), budget, lat.predict_config)
    assert fixed is not None and lat.predict_config(fixed) <= budget
    assert repair(tables, fixed, budget, lat.predict_config) == fixed  # what fits is kept as it is
    assert repair(tables, spec.full(), lo - 1.0, lat.predict_config) is None  # nothing can fit


def test_the_ladder_holds_picks_at_the_budget_and_halfway_down_to_the_margin():
    """The candidates between a budget and the margin below it: the joint, sparse and depth-only picks at
    the budget ("knapsack_stretch*", each the exact best of its space there) and halfway down
    ("knapsack_stretch_half*"), no width-only ones, no repeats, each within its own target."""
    spec, lat, qm = _models(num_layers=6)
    tables = LayerTables.build(lat, qm, spec)
    lo, hi = lat.range_ms(spec)
    budget, below = lo + 0.7 * (hi - lo), lo + 0.5 * (hi - lo)
    steps = ladder(tables, budget, below)
    assert len({c for _, c in steps}) == len(steps)
    top = [(s, c) for s, c in steps if "half" not in s]
    half = [(s, c) for s, c in steps if "half" in s]
    assert top[0] == ("knapsack_stretch", best_under_budget(tables, budget))
    assert half and half[0][1] == best_under_budget(tables, (budget + below) / 2)
    assert all(s.startswith("knapsack_stretch") and "width" not in s for s, _ in steps)
    assert all(lat.predict_config(c) <= budget + 1e-9 for _, c in top)
    assert all(lat.predict_config(c) <= (budget + below) / 2 + 1e-9 for _, c in half)
    assert any(lat.predict_config(c) > (budget + below) / 2 for _, c in top)  # the top rung uses the room above
    depth = [c for s, c in steps if s.endswith("_depth")]
    assert all(c.mlp_width == spec.full().mlp_width and c.heads == spec.full().heads for c in depth)


def test_with_a_margin_every_rungs_main_picks_come_first_down_to_one_rung_below_the_margin():
    """A verify session may measure every config a few % slower relative to the full model than the profile
    did: then neither the ladder nor the margin's picks fit, and without more a budget's row comes from the
    next lower budget's candidates. The joint and depth-path picks of every rung come first, from the budget
    down: the ladder's two rungs, the margin, and one margin further down ("knapsack_deep*", each the exact
    best of its space there, present even where another space picked the same config); then the other
    spaces' picks (a study with few trials keeps the first). Never below the floor; without a margin, the
    plain seeds."""
    from search.knapsack import path_depth_pick, path_pick

    spec, lat, qm = _models(num_layers=8)
    # a path whose prefixes cost little: at the deep rung the path pick is its depth-only pick (no cut pays),
    # and the ladder holds a pick of another space
    tables = _with_path(spec, lat, qm, [1, 2, 3, 4], [0.05, 0.1, 0.2, 0.4])
    lo, hi = lat.range_ms(spec)
    raw = lo + 0.7 * (hi - lo)
    target = raw * 0.9
    half, deep_at = (raw + target) / 2, target - (raw - target)
    got = budget_seeds(tables, raw, target, 3)
    names, configs = [s for s, _ in got], [c for _, c in got]
    assert len(set(configs)) == len(got)
    assert set(configs) >= {c for _, c in ladder(tables, raw, target)} | {c for _, c in seeds(tables, target, 1)}
    rungs = [(at, [best_under_budget(tables, at), path_pick(tables, at), path_depth_pick(tables, at)])
             for at in (raw, half, target)] + [(deep_at, [best_under_budget(tables, deep_at),
                                                           path_depth_pick(tables, deep_at)])]
    main = [c for _, picks in rungs for c in picks if c is not None]
    deep_depth = path_depth_pick(tables, deep_at)
    assert deep_depth is not None and deep_depth == path_pick(tables, deep_at)
    assert {c for _, c in ladder(tables, raw, target)} - set(main)  # another space's pick, to come after
    n_main = len(set(main))
    assert set(configs[:n_main]) == set(main), names  # every rung's main picks, before any other space's
    order = [min(i for i, (_, picks) in enumerate(rungs) if c in picks) for c in configs[:n_main]]
    assert order == sorted(order), names  # from the budget down
    assert all(lat.predict_config(c) <= deep_at + 1e-9 for s, c in got if s.startswith("knapsack_deep"))
    assert all(lat.predict_config(c) <= target + 1e-9 for s, c in got if not s.startswith("knapsack_stretch"))
    # the deep rung never goes below the floor (the fastest config): there it is the picks at the floor
    assert deep_target(raw, target) == pytest.approx(deep_at) and deep_target(10.0, 9.0, 8.5) == 8.5
    floor = target - 0.3 * (raw - target)
    at_floor = {c for c in (best_under_budget(tables, floor), path_depth_pick(tables, floor)) if c is not None}
    assert at_floor and at_floor <= {c for _, c in budget_seeds(tables, raw, target, 3, floor)}
    assert budget_seeds(tables, target, target, 3) == seeds(tables, target, 3)


def _with_path(spec, lat, qm, path, d_path):
    import dataclasses

    table = dataclasses.replace(qm.table, path=tuple(path), path_loss=tuple(d_path))
    return LayerTables.build(lat, QualityModel(table, spec), spec)


def test_the_path_pick_is_the_best_prefix_of_the_depth_path_with_widths_cut_elsewhere():
    """Brute force over every config that skips a prefix of the path (and no other layer): the pick fits,
    is one of them, and no other fitting one scores lower by the prefix's measured loss plus the width
    deltas of the layers it runs. Measured path losses far below the per-layer skip deltas make it skip
    layers the joint pick (per-layer deltas) keeps; without a path there is no path pick."""
    from search.knapsack import _width_loss, path_depth_pick, path_pick

    spec, lat, qm = _models(num_layers=5, seed=2)
    path = [3, 2, 1]
    lo, hi = lat.range_ms(spec)
    prefixed = {spec.canonical(SubnetConfig(w, h, path[:k])) for k in range(1, len(path) + 1)
                for w in itertools.product(*spec.mlp_widths) for h in itertools.product(*spec.head_counts)}
    lengths = {}
    for d_path in ([0.01, 0.02, 0.04], [0.01, 0.6, 2.5]):  # cheap prefixes; then steep: cut widths instead
        tables = _with_path(spec, lat, qm, path, d_path)
        for frac in (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9):
            budget = lo + frac * (hi - lo)
            pick = path_pick(tables, budget, tries=len(path))
            fitting = [c for c in prefixed if lat.predict_config(c) <= budget]
            if not fitting:
                assert pick is None
                continue
            assert pick in fitting

            def score(c):
                return tables.d_path[len(c.skip) - 1] + _width_loss(tables, c)

            assert score(pick) <= min(score(c) for c in fitting) + 1e-9
            lengths[(d_path[1], frac)] = len(pick.skip)
    assert any(lengths[(0.6, f)] < lengths[(0.02, f)] for f in (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)
               if (0.6, f) in lengths)  # steep losses: a shorter prefix with width cuts
    tables = _with_path(spec, lat, qm, path, [0.01, 0.02, 0.04])
    budget = lo + 0.6 * (hi - lo)
    assert path_pick(tables, budget) is not None and path_pick(tables, budget).skip
    assert path_pick(LayerTables.build(lat, qm, spec), budget) is None  # no path measured
    # the path's depth-only pick: the shortest prefix that fits at full width
    k = next(k for k in range(1, 4) if lat.predict_config(spec.depth(path[:k])) <= budget)
    assert path_depth_pick(tables, budget) == spec.depth(path[:k])
    assert path_depth_pick(tables, lo - 1.0) is None
    # with a path, the ladder tries its picks, and its depth-only one in place of the knapsack's
    steep = _with_path(spec, lat, qm, path, [0.01, 0.6, 2.5])
    budget = next(b for b in np.linspace(lo, hi, 41)  # where the best-scored prefix cuts widths
                  if path_pick(steep, b) not in (None, path_depth_pick(steep, b)) and path_depth_pick(steep, b))
    steps = ladder(steep, budget, lo + 0.5 * (budget - lo))
    assert ("knapsack_stretch_path", path_pick(steep, budget)) in steps
    assert ("knapsack_stretch_path_depth", path_depth_pick(steep, budget)) in steps
    assert not any(s.endswith("_depth") and "path" not in s for s, _ in steps)

"""The best config a quality model finds under a latency budget, exactly, and the repair of a proposal
that does not fit.

Both the latency model and the quality model are sums of per-layer terms (plus constants), so the
config that minimises predicted loss under a predicted-latency budget is a multiple-choice knapsack:
per layer one option (an MLP width with a head count, or the layer skipped), latency as the weight,
loss delta as the value. A dynamic program over the budget, discretised into `bins` steps with every
option's latency rounded up, solves it exactly for the rounded weights, so its answer always fits.

`path_pick` is the joint pick along the quality table's greedy depth path: skip one of its prefixes
(whose measured loss counts their interaction, which the per-layer deltas cannot) and cut widths in
the other layers to fit.

`repair` makes an over-budget proposal fit: it takes, one at a time, the change (one layer's MLP or
heads one step narrower, or the layer skipped) that costs the least predicted loss per ms saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flextron.spec import ElasticSpec, SubnetConfig

SPACES = ("joint", "width", "depth")  # every option; widths only (no skip); depth only (full width or skip)


@dataclass
class LayerTables:
    """Per-layer predicted latency (ms) and loss delta of every option, from the two models."""

    spec: ElasticSpec
    fixed_ms: float
    attn_ms: np.ndarray  # [L, n_heads]
    mlp_ms: np.ndarray  # [L, n_widths]
    skip_ms: np.ndarray | None  # [L], None: the latency model has no depth
    d_heads: list[np.ndarray]
    d_mlp: list[np.ndarray]
    d_skip: np.ndarray
    path: tuple[int, ...] = ()  # the quality table's greedy depth path (layers in the order it skips them)
    d_path: tuple[float, ...] = ()  # measured loss delta of skipping path[:k + 1] together

    @classmethod
    def build(cls, lat_model, qmodel, spec: ElasticSpec) -> "LayerTables":
        tab = lat_model.layer_table_ms(spec)
        d_mlp, d_heads, d_skip = qmodel.layer_tables()
        skip = tab["skip_ms"].numpy() if "skip_ms" in tab else None
        return cls(spec, float(tab["fixed_ms"]), tab["attn_ms"].numpy(), tab["mlp_ms"].numpy(), skip, d_heads, d_mlp,
                   d_skip, tuple(qmodel.table.path), tuple(qmodel.table.path_loss))

    def options(self, layer: int, space: str = "joint") -> list[tuple[tuple[int, int] | None, float, float]]:
        """(choice, ms, loss delta) of one layer: choice (width index, heads index), or None for skipped;
        space `skipped`: only the skip."""
        out = []
        nw, nh = len(self.spec.mlp_widths[layer]), len(self.spec.head_counts[layer])
        if space == "skipped":
            return [(None, float(self.skip_ms[layer]), 0.0)]
        if space != "depth":
            out += [((wi, hi), self.attn_ms[layer, hi] + self.mlp_ms[layer, wi],
                     self.d_mlp[layer][wi] + self.d_heads[layer][hi]) for wi in range(nw) for hi in range(nh)]
        else:
            out.append(((nw - 1, nh - 1), self.attn_ms[layer, nh - 1] + self.mlp_ms[layer, nw - 1], 0.0))
        if space != "width" and self.skip_ms is not None:
            out.append((None, float(self.skip_ms[layer]), float(self.d_skip[layer])))
        return out

    def config(self, choices: list[tuple[int, int] | None]) -> SubnetConfig:
        spec, full = self.spec, self.spec.full()
        widths = [full.mlp_width[l] if c is None else spec.mlp_widths[l][c[0]] for l, c in enumerate(choices)]
        heads = [full.heads[l] if c is None else spec.head_counts[l][c[1]] for l, c in enumerate(choices)]
        return SubnetConfig(tuple(widths), tuple(heads), tuple(l for l, c in enumerate(choices) if c is None))


def best_under_budget(tables: LayerTables, budget_ms: float, space: str = "joint", bins: int = 2000,
                      cut_penalty: float = 0.0, skipped: tuple[int, ...] = ()):
    """The config with the least predicted loss whose predicted latency is within `budget_ms` (the
    latency model's median scale), in `space`; None when nothing fits. Exact for latencies rounded
    up to `budget/bins` steps. `cut_penalty` adds that much predicted loss per layer whose widths are
    cut (not skipped, not full): the additive model under-counts width cuts spread over many layers
    (their damage compounds), so penalised picks concentrate the cuts in fewer layers. The layers in
    `skipped` are skipped, whatever `space`."""
    L = tables.spec.num_layers
    opts = [tables.options(l, "skipped" if l in skipped else space) for l in range(L)]
    if cut_penalty:
        full = [(len(tables.spec.mlp_widths[l]) - 1, len(tables.spec.head_counts[l]) - 1) for l in range(L)]
        opts = [[(c, ms, dq + (cut_penalty if c is not None and c != full[l] else 0.0)) for c, ms, dq in layer]
                for l, layer in enumerate(opts)]
    floor = [min(o[1] for o in layer) for layer in opts]  # per-layer least ms: the DP counts what is above it
    room = budget_ms - tables.fixed_ms - sum(floor)
    if room < 0:
        return None
    step = max(room, 1e-12) / bins
    dp = np.zeros(bins + 1)  # least loss delta of the layers so far using at most b steps
    picks = np.zeros((L, bins + 1), np.int64)
    for l, layer in enumerate(opts):
        new = np.full(bins + 1, np.inf)
        arg = np.zeros(bins + 1, np.int64)
        for j, (_, ms, dq) in enumerate(layer):
            k = int(math.ceil((ms - floor[l]) / step - 1e-9))
            if k > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[k:] = dp[: bins + 1 - k] + dq
            better = cand < new
            new[better], arg[better] = cand[better], j
        dp, picks[l] = new, arg
    if not np.isfinite(dp[bins]):
        return None
    choices, b = [None] * L, bins
    for l in range(L - 1, -1, -1):
        j = int(picks[l, b])
        choice, ms, _ = opts[l][j]
        choices[l] = choice
        b -= int(math.ceil((ms - floor[l]) / step - 1e-9))
    if all(c is None for c in choices):  # every layer skipped: not a model
        return None
    return tables.config(choices)


def sparse_penalties(tables: LayerTables) -> tuple[float, ...]:
    """Per-cut-layer penalties for the "sparse" picks: fractions of the median loss of skipping a layer
    (a width cut that costs a quarter of a skip, then a whole one); none without depth."""
    if tables.skip_ms is None or not len(tables.d_skip):
        return ()
    scale = float(np.median(np.maximum(tables.d_skip, 0.0)))
    return tuple(f * scale for f in (0.25, 1.0)) if scale > 0 else ()


def path_pick(tables: LayerTables, budget_ms: float, tries: int = 5) -> SubnetConfig | None:
    """The best config that skips a prefix of the depth path and cuts only widths elsewhere: for the
    `tries` prefixes ending at the shortest one that fits at full width (or the whole path), the
    knapsack over the other layers' widths, scored by the prefix's measured loss plus the width deltas.
    None without a path or when nothing fits."""
    if not tables.path or tables.skip_ms is None:
        return None
    last = _shortest_fitting(tables, budget_ms) or len(tables.path)
    best, best_loss = None, math.inf
    for k in range(max(1, last - tries + 1), last + 1):
        cfg = best_under_budget(tables, budget_ms, "width", skipped=tables.path[:k])
        if cfg is None:
            continue
        loss = tables.d_path[k - 1] + _width_loss(tables, cfg)
        if loss < best_loss:
            best, best_loss = cfg, loss
    return best


def path_depth_pick(tables: LayerTables, budget_ms: float) -> SubnetConfig | None:
    """The shortest prefix of the depth path that fits at full width, alone (None without a path or
    when none fits): the path's depth-only pick, which the scores of width cuts may wrongly pass over."""
    k = _shortest_fitting(tables, budget_ms) if tables.path and tables.skip_ms is not None else None
    return tables.spec.depth(tables.path[:k]) if k else None


def _shortest_fitting(tables: LayerTables, budget_ms: float) -> int | None:
    return next((k for k in range(1, len(tables.path) + 1) if _depth_ms(tables, tables.path[:k]) <= budget_ms), None)


def _depth_ms(tables: LayerTables, skipped) -> float:
    """Predicted ms of the full-width model with the layers in `skipped` skipped."""
    skipped = set(skipped)
    per_layer = [tables.skip_ms[l] if l in skipped else tables.attn_ms[l, -1] + tables.mlp_ms[l, -1]
                 for l in range(tables.spec.num_layers)]
    return tables.fixed_ms + float(sum(per_layer))


def _width_loss(tables: LayerTables, cfg: SubnetConfig) -> float:
    """The predicted loss of `cfg`'s width choices in the layers it runs."""
    spec, skipped = tables.spec, set(cfg.skip)
    return float(sum(tables.d_mlp[l][spec.mlp_widths[l].index(cfg.mlp_width[l])]
                     + tables.d_heads[l][spec.head_counts[l].index(cfg.heads[l])]
                     for l in range(spec.num_layers) if l not in skipped))


def picks_at(tables: LayerTables, budget_ms: float) -> list[tuple[str, SubnetConfig]]:
    """The knapsack's distinct picks for one budget in every space: joint, along the depth path (with width
    cuts, then depth alone), sparse (width cuts penalised per layer), depth-only, width-only. (source,
    config) pairs in that order."""
    return distinct(main_picks(tables, budget_ms) + other_picks(tables, budget_ms))


def distinct(pairs) -> list[tuple[str, SubnetConfig]]:
    """(source, config) pairs without a None or a repeated config, the first source kept."""
    seen, out = set(), []
    for source, cfg in pairs:
        if cfg is not None and cfg not in seen:
            seen.add(cfg)
            out.append((source, cfg))
    return out


def seeds(tables: LayerTables, budget_ms: float, n: int, spread: float = 0.04) -> list[tuple[str, SubnetConfig]]:
    """The knapsack's best configs for the budget: in the joint space at `n` budgets from `budget_ms`
    down to `spread` below it (distinct neighbours for Optuna to start from), then the sparse, depth-only
    and width-only ones (`picks_at`). (source, config) pairs, without repeats."""
    joint = [("knapsack", best_under_budget(tables, budget_ms * (1 - spread * j / max(n - 1, 1))))
             for j in range(max(n, 1))]
    return distinct(joint + picks_at(tables, budget_ms))


def _ladder_rungs(tables: LayerTables, budget_ms: float, below_ms: float):
    """(name, ms, spaces left out) of the ladder's two rungs: at the budget and halfway down to `below_ms`;
    with a depth path, its depth-only pick stands in for the knapsack's (which skips by single-layer deltas)."""
    leave = ("width",) + (("depth",) if tables.path else ())
    return (("knapsack_stretch", budget_ms, leave), ("knapsack_stretch_half", (budget_ms + below_ms) / 2, leave))


def ladder(tables: LayerTables, budget_ms: float, below_ms: float) -> list[tuple[str, SubnetConfig]]:
    """The knapsack's joint, depth-path, sparse and depth-only picks at `budget_ms` ("knapsack_stretch*") and
    halfway down to `below_ms` ("knapsack_stretch_half*"): candidates between a budget and the margin below it
    that a search aims at, for verify to try in loss order. (source, config) pairs, without repeats."""
    return distinct([p for name, at, leave in _ladder_rungs(tables, budget_ms, below_ms)
                     for p in main_picks(tables, at, name) + other_picks(tables, at, name, leave)])


def main_picks(tables: LayerTables, budget_ms: float, name: str = "knapsack") -> list[tuple[str, SubnetConfig]]:
    """A rung's joint pick and its picks along the depth path (with width cuts, then depth alone) at
    `budget_ms`, as `name`, `name`_path and `name`_path_depth; a pick another one repeats keeps the first
    label. (source, config) pairs."""
    return distinct([(name, best_under_budget(tables, budget_ms)), (f"{name}_path", path_pick(tables, budget_ms)),
                     (f"{name}_path_depth", path_depth_pick(tables, budget_ms))])


def other_picks(tables: LayerTables, budget_ms: float, name: str = "knapsack", leave: tuple[str, ...] = ()):
    """A rung's picks in the other spaces at `budget_ms`: sparse (`name`_sparse), depth-only and width-only
    (`name`_depth, `name`_width), but for the spaces in `leave`. (source, config) pairs."""
    out = [(f"{name}_sparse", best_under_budget(tables, budget_ms, cut_penalty=p)) for p in sparse_penalties(tables)]
    return distinct(out + [(f"{name}_{space}", best_under_budget(tables, budget_ms, space))
                           for space in ("depth", "width") if space not in leave])


def deep_rung(tables: LayerTables, budget_ms: float) -> list[tuple[str, SubnetConfig]]:
    """The joint and the depth path's depth-only picks at `budget_ms` as "knapsack_deep*": a search with a
    margin seeds them as far below the margin as the margin is below the budget, so where a measuring session
    runs slower relative to the full model than the profile did (a shift of several % between sessions on a
    noisy machine), verify still finds a candidate of this budget that fits before it takes the next lower
    budget's. (source, config) pairs, without repeats."""
    return distinct([("knapsack_deep", best_under_budget(tables, budget_ms)),
                     ("knapsack_deep_path_depth", path_depth_pick(tables, budget_ms))])


def deep_target(raw_ms: float, budget_ms: float, floor_ms: float = 0.0) -> float:
    """Where the deep rung aims: as far below the margin (`budget_ms`) as the margin is below the budget
    (`raw_ms`), never below `floor_ms` (the fastest config)."""
    return max(budget_ms - (raw_ms - budget_ms), floor_ms)


def budget_seeds(tables: LayerTables, raw_ms: float, budget_ms: float, n: int, floor_ms: float = 0.0):
    """A budget's seeds in the order a search enqueues them (a study with few trials keeps the first). With a
    margin (`budget_ms`, the search's target, below `raw_ms`, the budget itself): the joint and depth-path picks
    of every rung first, from the budget down (the ladder's two rungs, verify tries them in loss order; the
    margin; the deep rung one margin further down, not below `floor_ms`), then the ladder's and the margin's
    other spaces (sparse, depth-only, width-only), each labelled by the first rung and space that picked it.
    Without one: `n` joint picks spread down from the budget, then every space's pick there. (source,
    config) pairs, without repeats."""
    if raw_ms <= budget_ms:
        return seeds(tables, budget_ms, n)
    rungs = (*_ladder_rungs(tables, raw_ms, budget_ms), ("knapsack", budget_ms, ()))
    first = [p for name, at, _ in rungs for p in main_picks(tables, at, name)]
    rest = [p for name, at, leave in rungs for p in other_picks(tables, at, name, leave)]
    return distinct(first + deep_rung(tables, deep_target(raw_ms, budget_ms, floor_ms)) + rest)


def repair(tables: LayerTables, cfg: SubnetConfig, budget_ms: float, predict) -> SubnetConfig | None:
    """`cfg` made to fit `budget_ms` (by `predict`, the latency model's ms) by the cheapest changes in
    predicted loss per ms saved; `cfg` itself when it fits; None when nothing more can be cut."""
    spec = tables.spec
    w = [spec.mlp_widths[l].index(x) for l, x in enumerate(cfg.mlp_width)]
    h = [spec.head_counts[l].index(x) for l, x in enumerate(cfg.heads)]
    skipped = set(cfg.skip)
    current = cfg
    for _ in range(sum(len(ws) + len(hs) + 1 for ws, hs in zip(spec.mlp_widths, spec.head_counts))):
        if predict(current) <= budget_ms:
            return current
        moves = []  # (loss per ms saved, -ms saved, layer, kind)
        for l in range(spec.num_layers):
            if l in skipped:
                continue
            if w[l] > 0:
                saved = tables.mlp_ms[l, w[l]] - tables.mlp_ms[l, w[l] - 1]
                dq = tables.d_mlp[l][w[l] - 1] - tables.d_mlp[l][w[l]]
                moves.append((l, "mlp", saved, dq))
            if h[l] > 0:
                saved = tables.attn_ms[l, h[l]] - tables.attn_ms[l, h[l] - 1]
                dq = tables.d_heads[l][h[l] - 1] - tables.d_heads[l][h[l]]
                moves.append((l, "heads", saved, dq))
            if tables.skip_ms is not None and len(skipped) < spec.num_layers - 1:
                saved = tables.attn_ms[l, h[l]] + tables.mlp_ms[l, w[l]] - tables.skip_ms[l]
                dq = tables.d_skip[l] - tables.d_mlp[l][w[l]] - tables.d_heads[l][h[l]]
                moves.append((l, "skip", saved, dq))
        moves = [m for m in moves if m[2] > 0]
        if not moves:
            return None
        l, kind, _, _ = min(moves, key=lambda m: (max(m[3], 0.0) / m[2], -m[2]))
        if kind == "mlp":
            w[l] -= 1
        elif kind == "heads":
            h[l] -= 1
        else:
            skipped.add(l)
        current = spec.canonical(SubnetConfig(tuple(spec.mlp_widths[l][i] for l, i in enumerate(w)),
                                              tuple(spec.head_counts[l][i] for l, i in enumerate(h)),
                                              tuple(sorted(skipped))))
    return current if predict(current) <= budget_ms else None

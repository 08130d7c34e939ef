"""The quality model: what each per-layer choice costs in loss, measured once per weights.

`measure_table` changes one layer at a time (each MLP width, each head count, and the layer skipped)
and records the loss increase over the full model on calibration windows. Every change at layer l
shares the full model's computation up to l, so the inputs of every layer are captured once and
only layers l..L-1 and the LM head run per change (about 60% of a forward on average).

`QualityModel` predicts any config's loss from the table: the full model's loss plus the sum of
its choices' deltas (additive), or, when it earns its keep on real evaluations held out from the
choice, the three sums (MLP, heads, skips) each scaled by a fitted non-negative factor. Both are
sums of per-layer terms, so a knapsack over the per-layer tables optimises the model exactly, and
`layer_ranking` orders layers by the loss their removal costs (Minitron-style depth importance).

Skipped layers do not add up: removing several neighbours costs less than their single-layer deltas
say, and scattered ones more (SmolLM2 one-shot, 16k validation tokens: six layers by single deltas
42.9 ppl, along the path below 39.5; eight 64.9 against 53.0: benchmarks/depth_path.py).
`measure_table` therefore also walks a greedy *depth path*: from the full model, it skips, one step at
a time, the layer whose removal on top of the ones already skipped costs the least loss, trying the
neighbours of the skipped layers and the cheapest single-layer skips left (`PATH_SOLO`), and records
each prefix's measured loss. The path orders `layer_ranking` (the `depth:N` shorthand) and seeds the
search with its prefixes (search.knapsack.path_pick, path_depth_pick).

A layer's MLP deltas fall smoothly with width (SmolLM2's layer 0 in a session-15 demo's table: 1.94, 1.13,
0.58, 0.23, 0.15, 0.07, 0.02 nats from 192 to 1344 of 1536 neurons), so by default (`MLP_TABLES`
"alternate") only the two narrowest widths, every other one above and the widest narrower one are
measured and the others are filled in
log-linearly between their measured neighbours: 2 of SmolLM2's 10 changes a layer fewer; on seven runs
(two distinct tables) the filled entries lie 0.009-0.010 nats from the measured ones on average and the
held-out Spearman moves by -0.004 to +0.007 (median +0.002; benchmarks/mlp_table.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flextron import bridges as bridging
from flextron.errors import FlextronError
from flextron.spec import ElasticSpec, SubnetConfig

TABLE_FILE = "quality_table.json"
FORMS = ("additive", "scaled", "scaled_counts")
PATH_SOLO = 3  #: each step of the depth path also tries this many of the cheapest single-layer skips left
MLP_TABLES = ("alternate", "all")  #: which narrower MLP widths the table measures (see the module's doc)


def measured_mlp(n: int, mode: str) -> list[int]:
    """The indices of a layer's `n` MLP widths (narrowest first, the last the full width, delta 0) the table
    measures: every narrower one (`all`), or the two narrowest, every other one above and the widest narrower
    one (the cheapest cut, which the search uses most: never filled in toward the full width's 0)
    (`alternate`)."""
    if mode not in MLP_TABLES:
        raise FlextronError(f"unknown MLP table {mode!r}; use one of {list(MLP_TABLES)}")
    return [i for i in range(n - 1) if mode == "all" or i < 2 or i == n - 2 or (i - 1) % 2 == 0]


def fill_mlp(values: list[float], measured: list[int]) -> list[float]:
    """`values` (one per width, the full width's 0 last) with every index not in `measured` filled in between
    its measured neighbours: log-linearly where both are positive, else linearly (the full width's 0)."""
    known = sorted(set(measured) | {len(values) - 1})
    out = list(values)
    for i in range(len(values)):
        if i in known:
            continue
        lo, hi = max(k for k in known if k < i), min(k for k in known if k > i)
        a, b, t = values[lo], values[hi], (i - lo) / (hi - lo)
        out[i] = math.exp((1 - t) * math.log(a) + t * math.log(b)) if a > 0 and b > 0 else (1 - t) * a + t * b
    return out


def quality_dir(run_root: str | Path, weights: str) -> Path:
    """Where the quality table and model of one set of weights live: RUN/quality/<weights>/."""
    from flextron.rundir import safe_name

    return Path(run_root) / "quality" / safe_name(weights)


def layer_ranking(run_root: str | Path, weights: str) -> list[int] | None:
    """The run's layers by the loss their removal costs (cheapest first), from its quality table of
    `weights`; None when `flextron quality` has not measured one."""
    path = quality_dir(run_root, weights) / TABLE_FILE
    return QualityTable.load(path).layer_ranking() if path.is_file() else None


@dataclass(frozen=True)
class QualityTable:
    """Per-layer loss deltas (nats) of one set of weights on calibration windows.

    `mlp[l][i]`: loss(full with layer l's MLP at `spec.mlp_widths[l][i]`) - loss(full); the last
    entry (full width) is 0. `heads[l][i]` likewise for `spec.head_counts[l]`; `skip[l]`: layer l
    skipped. `key` identifies what it was measured from (weights tag, corpus, windows, spec).
    `path`: the greedy depth path's layers in the order it skips them; `path_loss[k]`: the measured
    loss delta of skipping `path[:k + 1]` together (both empty in tables measured before the path)."""

    base_loss: float
    mlp: tuple[tuple[float, ...], ...]
    heads: tuple[tuple[float, ...], ...]
    skip: tuple[float, ...]
    key: dict = field(default_factory=dict)
    seconds: float = 0.0
    path: tuple[int, ...] = ()
    path_loss: tuple[float, ...] = ()
    path_seconds: float = 0.0

    def check(self, spec: ElasticSpec) -> "QualityTable":
        ok = (len(self.mlp) == len(self.heads) == len(self.skip) == spec.num_layers
              and all(len(m) == len(ws) for m, ws in zip(self.mlp, spec.mlp_widths))
              and all(len(h) == len(hs) for h, hs in zip(self.heads, spec.head_counts))
              and len(self.path) == len(self.path_loss) and len(set(self.path)) == len(self.path)
              and all(0 <= l < spec.num_layers for l in self.path))
        if not ok:
            raise FlextronError("the quality table does not match this model's elastic spec; re-run "
                                "`flextron quality --restart`")
        return self

    def sums(self, spec: ElasticSpec, cfgs: list[SubnetConfig]) -> np.ndarray:
        """[n, 6]: each config's summed MLP, head and skip deltas, then how many layers have a narrower
        MLP, fewer heads, or are skipped."""
        out = np.zeros((len(cfgs), 6))
        for n, c in enumerate(cfgs):
            skipped = set(c.skip)
            for l in range(spec.num_layers):
                if l in skipped:
                    out[n, 2] += self.skip[l]
                    out[n, 5] += 1
                else:
                    wi, hi = spec.mlp_widths[l].index(c.mlp_width[l]), spec.head_counts[l].index(c.heads[l])
                    out[n, 0] += self.mlp[l][wi]
                    out[n, 1] += self.heads[l][hi]
                    out[n, 3] += wi < len(spec.mlp_widths[l]) - 1
                    out[n, 4] += hi < len(spec.head_counts[l]) - 1
        return out

    def solo_ranking(self) -> list[int]:
        """Layers ordered by the loss their removal alone costs, cheapest first."""
        return sorted(range(len(self.skip)), key=lambda l: (self.skip[l], l))

    def layer_ranking(self) -> list[int]:
        """The order in which to skip layers: the depth path's, then the others by the loss their
        removal alone costs (without a path: that order alone)."""
        return list(self.path) + [l for l in self.solo_ranking() if l not in set(self.path)]

    def to_dict(self) -> dict:
        return {"base_loss": self.base_loss, "mlp": [list(m) for m in self.mlp], "heads": [list(h) for h in self.heads],
                "skip": list(self.skip), "key": self.key, "seconds": self.seconds, "path": list(self.path),
                "path_loss": list(self.path_loss), "path_seconds": self.path_seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "QualityTable":
        try:
            t = cls(float(d["base_loss"]), tuple(tuple(map(float, m)) for m in d["mlp"]),
                    tuple(tuple(map(float, h)) for h in d["heads"]), tuple(map(float, d["skip"])),
                    dict(d.get("key", {})), float(d.get("seconds", 0.0)), tuple(map(int, d.get("path", ()))),
                    tuple(map(float, d.get("path_loss", ()))), float(d.get("path_seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise FlextronError(f"not a quality table ({type(e).__name__}: {e}); re-run `flextron quality --restart`")
        values = [t.base_loss, *t.skip, *(v for m in t.mlp for v in m), *(v for h in t.heads for v in h), *t.path_loss]
        if not all(math.isfinite(v) for v in values):
            raise FlextronError("the quality table holds a non-finite loss; re-run `flextron quality --restart`")
        return t

    @classmethod
    def load(cls, path: str | Path) -> "QualityTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise FlextronError(f"cannot read the quality table {path} ({e}); re-run `flextron quality --restart`")


class _Suffix:
    """Runs the model from layer l onwards on captured inputs: each single-layer change shares the
    full model's computation below l (the depth path replaces `inputs` with its own as it goes)."""

    def __init__(self, elastic, ids):
        import torch

        self.torch, self.elastic, self.ids = torch, elastic, ids
        model = elastic.model
        self.layers = elastic._all_layers
        self.inputs: dict[int, tuple] = {}
        hooks = []
        for i, layer in enumerate(self.layers):
            def grab(mod, args, kwargs, i=i):
                self.inputs[i] = (args[0], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad(), elastic.use(elastic.spec.full()):
                self.base = self._loss(model(input_ids=ids, use_cache=False).logits)
        finally:
            for h in hooks:
                h.remove()
        self.norm = model.model.norm
        self.cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-style logit capping

    def _loss(self, logits) -> float:
        import torch.nn.functional as F

        logits = logits[:, :-1].float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.ids[:, 1:].reshape(-1)))

    def loss(self, cfg: SubnetConfig, first: int, record: dict | None = None) -> float:
        """Loss of `cfg`, which equals the config the inputs were captured under below layer `first` (and
        runs layer `first` or skips it). `record`, when given, receives the input of every layer it runs."""
        torch = self.torch
        el = self.elastic
        with torch.no_grad(), el.use(cfg):
            h = self.inputs[first][0]
            skipped = set(cfg.skip)
            # Skipped layers from `first` on whose bridges hang on an active layer below `first` (which does
            # not run here): applied by hand. Later bridges run in the hooks of the layers run below.
            if first in skipped and el.bridges is not None and any(a not in skipped for a in range(first)):
                bridges = el.cast_bridges()
                for i in range(first, len(self.layers)):
                    if i not in skipped:
                        break
                    if bridging.used(el.bridges, i):
                        h = bridging.apply_bridge(h, bridges[i], el.rms_eps)
            for i in range(first, len(self.layers)):
                if i not in skipped:
                    kwargs = dict(self.inputs[i][1])
                    if record is not None:
                        record[i] = (h, self.inputs[i][1])
                    h = self.layers[i](h, **kwargs)
                    h = h[0] if isinstance(h, tuple) else h
            logits = el.model.lm_head(self.norm(h))
            if self.cap:
                logits = torch.tanh(logits / self.cap) * self.cap
        return self._loss(logits)


def measure_table(elastic, windows, key: dict | None = None, progress=None, path_steps: int = 0,
                  mlp_table: str = "all") -> QualityTable:
    """Change one layer at a time (each MLP width `mlp_table` measures, each head count, skipped) and record
    the loss increase over the full model on `windows` [n, seq_len] (one batch), the MLP widths it does not
    measure filled in (`fill_mlp`); then walk the greedy depth path for `path_steps` steps (0: none)."""
    import time

    t0 = time.perf_counter()
    spec = elastic.spec
    run = _Suffix(elastic, windows.to(elastic.device))
    full = spec.full()
    mlp = [[0.0] * len(ws) for ws in spec.mlp_widths]
    heads = [[0.0] * len(hs) for hs in spec.head_counts]
    skip = [0.0] * spec.num_layers
    jobs = []
    for l in range(spec.num_layers):
        jobs.append((l, "skip", 0))
        jobs += [(l, "mlp", i) for i in measured_mlp(len(spec.mlp_widths[l]), mlp_table)]
        jobs += [(l, "heads", i) for i in range(len(spec.head_counts[l]) - 1)]
    for l, kind, i in (progress(jobs, desc="quality table") if progress else jobs):
        if kind == "skip":
            cfg = spec.depth([l])
        elif kind == "mlp":
            cfg = SubnetConfig(tuple(spec.mlp_widths[l][i] if j == l else w for j, w in enumerate(full.mlp_width)),
                               full.heads)
        else:
            cfg = SubnetConfig(full.mlp_width,
                               tuple(spec.head_counts[l][i] if j == l else h for j, h in enumerate(full.heads)))
        delta = run.loss(cfg, l) - run.base
        if kind == "skip":
            skip[l] = delta
        else:
            (mlp if kind == "mlp" else heads)[l][i] = delta
    mlp = [fill_mlp(m, measured_mlp(len(m), mlp_table)) for m in mlp]
    table = QualityTable(run.base, tuple(map(tuple, mlp)), tuple(map(tuple, heads)), tuple(skip), dict(key or {}),
                         round(time.perf_counter() - t0, 2))
    return with_depth_path(table, elastic, windows, path_steps, progress, run)


def with_depth_path(table: QualityTable, elastic, windows, steps: int, progress=None, run=None) -> QualityTable:
    """`table` with the greedy depth path of `steps` steps measured on `windows` (the table's own: the
    path's losses are deltas over the same base)."""
    import dataclasses
    import time

    if steps <= 0:  # none asked: no path (a kept one is dropped)
        return dataclasses.replace(table, path=(), path_loss=(), path_seconds=0.0)
    t0 = time.perf_counter()
    run = run or _Suffix(elastic, windows.to(elastic.device))
    path, losses = depth_path(run, elastic.spec, list(table.skip), steps, progress)
    return dataclasses.replace(table, path=tuple(path), path_loss=tuple(losses),
                               path_seconds=round(time.perf_counter() - t0, 2))


def path_candidates(skipped: list[int], solo: list[float], num_layers: int) -> list[int]:
    """The layers one step of the depth path tries: the neighbours of the layers skipped so far and the
    PATH_SOLO cheapest single-layer skips left, never the last layer standing."""
    done = set(skipped)
    near = {n for l in skipped for n in (l - 1, l + 1) if 0 <= n < num_layers and n not in done}
    cheap = [l for l in sorted(range(num_layers), key=lambda l: (solo[l], l)) if l not in done][:PATH_SOLO]
    out = sorted(near | set(cheap))
    return out if len(done) + 1 < num_layers else []


def depth_path(run: _Suffix, spec: ElasticSpec, solo: list[float], steps: int, progress=None):
    """The greedy depth path (see the module's doc): at most `steps` layers, each the candidate whose
    removal on top of the ones before costs the least measured loss. `run` holds the full model's inputs
    (it is left holding the path's). Returns (layers, loss deltas)."""
    path, losses = [], []
    steps = min(steps, spec.num_layers - 1)
    bar = progress(total=steps, desc="quality: depth path") if progress and steps else None
    for _ in range(steps):
        cands = path_candidates(path, solo, spec.num_layers)
        if not cands:
            break
        # each candidate runs from its own layer on the current path's captured inputs; the winner's
        # recorded inputs from there on (and the path's below) are the next step's capture
        tried = []
        for l in cands:
            record: dict = {}
            tried.append((run.loss(spec.depth(path + [l]), l, record) - run.base, l, record))
        delta, layer, record = min(tried, key=lambda t: (t[0], t[1]))
        run.inputs = {i: v for i, v in run.inputs.items() if i < layer and i not in path} | record
        path.append(layer)
        losses.append(delta)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return path, losses


class QualityModel:
    """Predicts a config's loss from a QualityTable (scikit-learn contract: `fit(configs, losses)`
    returns self, learned state ends in `_`).

    `additive`: base + sum of the config's deltas. `scaled`: base + a_mlp * MLP deltas + a_heads *
    head deltas + a_skip * skip deltas, a >= 0 fitted by least squares on real evaluations (single
    layer deltas underestimate what several changes together cost). `scaled_counts`: also a
    non-negative cost per changed layer of each kind (narrowed MLP, fewer heads, skipped): many
    small cuts compound beyond their single-layer deltas, which the counts charge for. Every form is
    a sum of per-layer terms (`layer_tables`). The form is chosen by leave-one-out error on the
    configs given to `fit`; without any, additive.
    """

    N_COLUMNS = {"additive": 0, "scaled": 3, "scaled_counts": 6}

    def __init__(self, table: QualityTable, spec: ElasticSpec, forms=FORMS):
        self.table = table.check(spec)
        self.spec = spec
        self.forms = forms

    def _fit_scales(self, form: str, S: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.optimize import nnls

        k = self.N_COLUMNS[form]
        if not k:
            return np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
        return np.concatenate([nnls(S[:, :k], y - self.table.base_loss)[0], np.zeros(6 - k)])

    def fit(self, configs: list[SubnetConfig], losses) -> "QualityModel":
        y = np.asarray(losses, float)
        S = self.table.sums(self.spec, configs)
        self.cv_mae_ = {}
        for form in self.forms:
            if form != "additive" and len(y) < 2 * self.N_COLUMNS[form]:
                continue  # too few evaluations to fit it and leave one out
            errs = []
            for i in range(len(y)):
                keep = np.arange(len(y)) != i
                a = self._fit_scales(form, S[keep], y[keep])
                errs.append(abs(self.table.base_loss + S[i] @ a - y[i]))
            self.cv_mae_[form] = float(np.mean(errs)) if errs else 0.0
        self.form_ = min(self.cv_mae_, key=self.cv_mae_.get) if self.cv_mae_ else "additive"
        self.scales_ = self._fit_scales(self.form_, S, y)
        return self

    def scales(self) -> np.ndarray:
        """(a_mlp, a_heads, a_skip, per narrowed MLP, per reduced heads, per skipped layer)."""
        return getattr(self, "scales_", np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))

    def predict(self, configs: list[SubnetConfig]) -> np.ndarray:
        return self.table.base_loss + self.table.sums(self.spec, configs) @ self.scales()

    def predict_config(self, cfg: SubnetConfig) -> float:
        return float(self.predict([cfg])[0])

    def layer_tables(self) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Scaled per-layer deltas: MLP [L][n_w], heads [L][n_h], skip [L]; a config's predicted loss
        is base + the sum of its choices' entries."""
        a = self.scales()

        def cut(values, scale, per_change):  # the last entry is the full size: no change, no count
            v = scale * np.asarray(values, float)
            v[:-1] += per_change
            return v

        return ([cut(m, a[0], a[3]) for m in self.table.mlp], [cut(h, a[1], a[4]) for h in self.table.heads],
                a[2] * np.asarray(self.table.skip) + a[5])

    def to_dict(self) -> dict:
        return {"form_": getattr(self, "form_", "additive"), "scales_": [float(v) for v in self.scales()],
                "cv_mae_": getattr(self, "cv_mae_", {})}

    @classmethod
    def from_dict(cls, d: dict, table: QualityTable, spec: ElasticSpec) -> "QualityModel":
        m = cls(table, spec)
        m.form_ = d.get("form_", "additive")
        m.scales_ = np.asarray(d.get("scales_", [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), float)
        if m.scales_.shape != (6,) or not np.isfinite(m.scales_).all() or (m.scales_ < 0).any():
            raise FlextronError("the quality model's scales are damaged; re-run `flextron quality --restart`")
        m.cv_mae_ = d.get("cv_mae_", {})
        return m

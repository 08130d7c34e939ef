"""The latency model: predict a sub-network's end-to-end latency from its per-layer choices.

The sweep's isolated per-layer times are the prior. Summing them misses what only the whole model
shows (launch gaps, norms and residual adds, cache effects between layers, host time in eager
mode), so `LatencyModel` learns from part of the end-to-end set: a scaled or host-bound
(max(host, device) per module) form of the isolated times, plus per-choice terms (one per group of
identical layers) shrunk toward them, chosen by cross-validation on the training configs.
`LatencyModels` reads a run's fitted models (`flextron fit`, profiler/fit.py, writes them). Saved as
plain JSON: loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

MODEL_FILE = "latency_model.json"
METRICS_FILE = "metrics.json"


FORMS = ("scaled", "host_bound")
ALPHAS = (None, 10.0, 1.0, 0.1)  # ridge strength of the per-layer terms learned end to end; None: none learned


class LatencyModel(RegressorMixin, BaseEstimator):
    """scikit-learn regressor: X is [n, 2L] ints (MLP widths of layers 0..L-1, then head counts),
    y is measured end-to-end latency in ms.

    A prediction is `intercept + sum_l attn_eff[l, heads_l] + mlp_eff[l, width_l]`, with per-layer,
    per-choice effective costs built in two steps, both fitted to the end-to-end set:

    1. From the sweep's isolated times A[l, h] and M[l, w], in one of two forms:
       `scaled`: a_attn * A and a_mlp * M (device-bound: the step is the sum of its kernels), or
       `host_bound`: max(h_attn, a_attn * A) and max(h_mlp, a_mlp * M), where h is the host's cost of
       one module call (eager steps on a fast device wait for the host when the kernels are short).
    2. Plus per-choice terms, one per group of identical layers (`_groups`), learned from the end-to-end
       configs themselves and shrunk toward zero by a ridge penalty (so toward step 1, the isolated
       times): what isolated layers miss (cache effects between layers, launch gaps that depend on the
       shape).

    The form and the ridge strength are chosen by cross-validation on the training configs only.
    Every choice stays additive and independent per layer, so `range_ms` is exact and
    `layer_table_ms` hands the routers the same costs the model predicts with.

    Args:
        attn_table: {layer: {heads: isolated attention ms}} for one regime and device.
        mlp_table: {layer: {width: isolated MLP ms}}.
        fixed_ms: isolated embedding + final norm + LM head time.
        layer_table: {layer: isolated ms of the whole decoder layer at full width}, from a profile that
            measured depth (None: an older profile; configs that skip layers are then refused). With it,
            skipping a layer is one more choice per layer, encoded as width 0 and heads 0, whose prior
            cost is its bridge's isolated time (`bridge_table`; 0 for a layer without one: nothing of the
            layer runs), unscaled by the form's coefficients. The layer's own cost beyond its attention and MLP
            (norms, residual adds, the call itself: whole layer minus both modules) joins its attention
            choices, so a skip saves it too; the learned per-choice terms correct both from the
            end-to-end configs that skip layers.
        forms: the forms tried (see above).
        alphas: the ridge strengths tried for the learned per-layer terms (None: none learned).
        cv_folds: folds of the cross-validation that chooses among them.
        tie_layers: layers with identical isolated tables share their learned terms (see `_groups`);
            False learns every layer's own (the model before session 10, kept for comparison).
        bridge_table: {layer: isolated ms of the layer's linear bridge (flextron.bridges)} from the
            profile, for the layers that have one (None: a profile without bridge cells).
    """

    def __init__(self, attn_table=None, mlp_table=None, fixed_ms: float = 0.0, forms=FORMS, alphas=ALPHAS,
                 cv_folds: int = 5, layer_table=None, tie_layers: bool = True, bridge_table=None):
        self.attn_table = attn_table
        self.mlp_table = mlp_table
        self.fixed_ms = fixed_ms
        self.forms = forms
        self.alphas = alphas
        self.cv_folds = cv_folds
        self.layer_table = layer_table
        self.tie_layers = tie_layers
        self.bridge_table = bridge_table

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def depth(self) -> bool:
        """Whether this model can predict configs that skip layers (its profile measured whole layers)."""
        return bool(self.layer_table)

    def _choices(self):
        """Per layer, the head counts and MLP widths in column order; with depth, 0 (skipped) first."""
        L = len(self.mlp_table)
        skip = [0] if self.depth else []
        heads = [skip + sorted(self.attn_table.get(l, {})) for l in range(L)]
        widths = [skip + sorted(self.mlp_table.get(l, {})) for l in range(L)]
        return heads, widths

    def _overhead_ms(self, layer: int) -> float:
        """What a layer costs beyond its attention and MLP at full size (norms, residual adds, the call):
        the whole layer's isolated time minus both modules', never below 0 (noise can make it so)."""
        if not self.depth:
            return 0.0
        a, m = self.attn_table[layer], self.mlp_table[layer]
        return max(0.0, float(self.layer_table[layer]) - a[max(a)] - m[max(m)])

    def _cell_ms(self, layer: int, width: int, heads: int) -> tuple[float, float]:
        """Isolated (attention ms at `heads`, MLP ms at `width`) of one layer; (0, 0) when skipped."""
        if width == 0 or heads == 0:
            if not self.depth:
                raise FlextronError(
                    f"layer {layer} is skipped, but this latency model was fitted on a profile without whole-layer "
                    "cells (made before depth was an elastic dimension); re-run `flextron profile --restart` and "
                    "`flextron fit` to search or predict configs that skip layers"
                )
            if width != heads:
                raise FlextronError(f"layer {layer}: width {width} / heads {heads}: a layer is skipped whole "
                                    "(both 0) or runs (both positive)")
            return 0.0, 0.0
        try:
            return self.attn_table[layer][heads], self.mlp_table[layer][width]
        except KeyError:
            raise FlextronError(
                f"layer {layer}: width {width} / heads {heads} was not profiled (profiled MLP widths "
                f"{sorted(self.mlp_table.get(layer, {}))}, heads {sorted(self.attn_table.get(layer, {}))}); "
                "re-run `flextron profile` with this ElasticSpec"
            ) from None

    def _indices(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer choice indices [n, L] of the heads and of the MLP widths."""
        X = np.asarray(X, dtype=np.int64)
        L = len(self.mlp_table)
        if X.ndim != 2 or X.shape[1] != 2 * L:
            raise FlextronError(f"expected configs as [n, {2 * L}] (widths then heads), got shape {X.shape}")
        heads, widths = self._choices()
        hpos = [{h: i for i, h in enumerate(hs)} for hs in heads]
        wpos = [{w: i for i, w in enumerate(ws)} for ws in widths]
        hi, wi = np.zeros((len(X), L), np.int64), np.zeros((len(X), L), np.int64)
        for n, row in enumerate(X):
            for l in range(L):
                w, h = int(row[l]), int(row[L + l])
                if h not in hpos[l] or w not in wpos[l] or (w == 0) != (h == 0):
                    self._cell_ms(l, w, h)  # raises, naming what was profiled
                hi[n, l], wi[n, l] = hpos[l][h], wpos[l][w]
        return hi, wi

    def _priors(self) -> tuple[np.ndarray, np.ndarray]:
        """Isolated times as arrays A [L, max heads choices], M [L, max width choices] (NaN-padded)."""
        heads, widths = self._choices()
        L = len(heads)
        A = np.full((L, max(map(len, heads))), np.nan)
        M = np.full((L, max(map(len, widths))), np.nan)
        for l in range(L):
            over = self._overhead_ms(l)
            A[l, :len(heads[l])] = [self.attn_table[l][h] + over if h else 0.0 for h in heads[l]]
            M[l, :len(widths[l])] = [self.mlp_table[l][w] if w else 0.0 for w in widths[l]]
        return A, M

    def _sums(self, X) -> np.ndarray:
        """[n, 2]: the isolated attention and MLP times of each config, summed over layers."""
        hi, wi = self._indices(X)
        A, M = self._priors()
        rows = np.arange(A.shape[0])
        return np.stack([A[rows, hi].sum(1), M[rows, wi].sum(1)], axis=1)

    # ---- the model ------------------------------------------------------------------------------
    def _bridges_ms(self) -> np.ndarray:
        """[L] isolated ms of each layer's bridge (0 where it has none, or the profile timed none)."""
        return np.array([float((self.bridge_table or {}).get(l, 0.0)) for l in range(len(self.mlp_table))])

    def _base(self, form: str, theta, A, M):
        c, a, m = theta[:3]
        if form == "scaled":
            Ae, Me = a * A, m * M
        else:
            Ae, Me = np.maximum(theta[3], a * A), np.maximum(theta[4], m * M)
        if self.depth:  # a skipped layer runs its bridge, as timed alone, or nothing: no host floor either
            Ae[:, 0], Me[:, 0] = 0.0, self._bridges_ms()
        return c, Ae, Me

    def _groups(self) -> np.ndarray:
        """[L] group index of every layer: layers whose isolated tables are identical (one shape, pooled
        by `pool_layers`) share one learned term per choice. A knapsack over per-layer terms fitted to a few
        dozen configs picks the layers whose terms happen to read cheapest (noise, not latency); tied
        terms give it nothing to exploit and leave each far more configs to learn from."""
        A, M = self._priors()
        rows = [np.nan_to_num(np.concatenate([A[l], M[l]]), nan=-1.0).tobytes() for l in range(A.shape[0])]
        first: dict = {}
        return np.asarray([first.setdefault(r, len(first)) for r in rows], np.int64)

    def _fit_one(self, form, alpha, hi, wi, y, iters: int = 8):
        """(theta, delta_attn [L, H], delta_mlp [L, W]) fitted to (hi, wi) -> y: the form's few
        parameters and the ridge-shrunk per-choice terms (one per group of identical layers, see
        `_groups`) by backfitting (each fitted to what the other leaves), so an effect only some
        configs show is not smeared into the form's coefficients."""
        from scipy.optimize import least_squares
        from sklearn.linear_model import LinearRegression

        A, M = self._priors()
        L, H, W = A.shape[0], A.shape[1], M.shape[1]
        rows = np.arange(L)
        group = self._groups() if self.tie_layers else rows
        G = int(group.max()) + 1
        sums = np.stack([A[rows, hi].sum(1), M[rows, wi].sum(1)], axis=1)
        lin = LinearRegression(positive=True).fit(sums, y)
        theta = [float(lin.intercept_), *map(float, lin.coef_)]
        if form == "host_bound":  # start the host floors at the cheapest module call (a skip is no call)
            first = 1 if self.depth else 0
            theta += [float(np.nanmin(A[:, first:])), float(np.nanmin(M[:, first:]))]
        lo = [-np.inf] + [0.0] * (len(theta) - 1)
        theta = np.asarray([max(v, b + 1e-12) if np.isfinite(b) else v for v, b in zip(theta, lo)])

        def base(t):
            c, Ae, Me = self._base(form, t, A, M)
            return c + Ae[rows, hi].sum(1) + Me[rows, wi].sum(1)

        phi = np.zeros((len(y), G * (H + W)))  # counts of every (layer group, choice)
        for n in range(len(y)):
            np.add.at(phi[n], group * H + hi[n], 1.0)
            np.add.at(phi[n], G * H + group * W + wi[n], 1.0)
        scale = float(np.mean(y))
        learned = np.zeros(len(y))
        delta = np.zeros(G * (H + W))
        for _ in range(iters if alpha is not None else 1):
            target = y - learned
            # relative residuals: the error that matters is the relative one (MAPE), small configs included
            theta = least_squares(lambda t: (base(t) - target) / y, theta, bounds=(lo, np.inf)).x
            if alpha is None:
                break
            r = (y - base(theta)) / scale  # ridge on the residual, dual form (configs << features)
            delta = phi.T @ np.linalg.solve(phi @ phi.T + alpha * np.eye(len(y)), r) * scale
            learned = phi @ delta
        return np.asarray(theta, float), delta[: G * H].reshape(G, H)[group], delta[G * H:].reshape(G, W)[group]

    def _predict_with(self, form, theta, dA, dM, hi, wi):
        A, M = self._priors()
        rows = np.arange(A.shape[0])
        c, Ae, Me = self._base(form, theta, A, M)
        return c + (Ae + dA)[rows, hi].sum(1) + (Me + dM)[rows, wi].sum(1)

    def fit(self, X, y):
        from sklearn.model_selection import KFold

        y = np.asarray(y, dtype=float)
        hi, wi = self._indices(X)
        candidates = [(f, a) for f in self.forms for a in self.alphas]
        k = min(self.cv_folds, len(y))
        cv = {}
        if len(candidates) > 1 and k >= 2:
            for form, alpha in candidates:
                errs = []
                for tr, va in KFold(k, shuffle=True, random_state=0).split(hi):
                    theta, dA, dM = self._fit_one(form, alpha, hi[tr], wi[tr], y[tr])
                    p = self._predict_with(form, theta, dA, dM, hi[va], wi[va])
                    errs += list(np.abs(p - y[va]) / y[va])
                cv[f"{form}/{alpha}"] = round(100 * float(np.mean(errs)), 4)
            best = min(candidates, key=lambda fa: cv[f"{fa[0]}/{fa[1]}"])
        else:
            best = candidates[0]
        self.form_, self.alpha_ = best
        theta, self.delta_attn_, self.delta_mlp_ = self._fit_one(*best, hi, wi, y)
        self.intercept_ = float(theta[0])
        self.coef_ = theta[1:3].astype(float)
        self.host_ms_ = theta[3:5].astype(float) if self.form_ == "host_bound" else np.zeros(2)
        self.cv_mape_pct_ = cv
        return self

    def _effective(self) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)  # a NotFittedError naming `fit`, not a missing attribute
        A, M = self._priors()
        theta = np.concatenate([[self.intercept_], self.coef_, self.host_ms_])
        _, Ae, Me = self._base(self.form_, theta, A, M)
        return Ae + self.delta_attn_, Me + self.delta_mlp_

    def predict(self, X) -> np.ndarray:
        hi, wi = self._indices(X)
        Ae, Me = self._effective()
        rows = np.arange(Ae.shape[0])
        return self.intercept_ + Ae[rows, hi].sum(1) + Me[rows, wi].sum(1)

    def predict_config(self, cfg: SubnetConfig) -> float:
        """Predicted end-to-end ms of one config."""
        return float(self.predict(encode([cfg]))[0])

    def range_ms(self, spec) -> tuple[float, float]:
        """(least, greatest) predicted end-to-end ms over every config of `spec`, exactly.

        A prediction is a sum of per-layer terms with independent choices, so its extremes are the
        sums of per-layer extremes. The narrowest config is not assumed fastest: a noisy profile can
        time a narrow width slower than a wider one.
        """
        if spec.num_layers != len(self.mlp_table):
            raise FlextronError(f"the spec has {spec.num_layers} layers, the latency model {len(self.mlp_table)}; "
                                "re-run `flextron profile` and `flextron fit` for this model")
        tab = self.layer_table_ms(spec)
        run_lo = (tab["attn_ms"].min(-1).values + tab["mlp_ms"].min(-1).values).numpy()
        run_hi = (tab["attn_ms"].max(-1).values + tab["mlp_ms"].max(-1).values).numpy()
        if "skip_ms" not in tab:
            return self.intercept_ + float(run_lo.sum()), self.intercept_ + float(run_hi.sum())
        skip = tab["skip_ms"].numpy()
        # Each layer runs or is skipped, whichever is extreme, but at least one layer runs: if every layer's
        # extreme is a skip, the layer that costs least to keep running is kept.
        lo_l, hi_l = np.minimum(run_lo, skip), np.maximum(run_hi, skip)
        lo = lo_l.sum() + (min(run_lo - skip) if (skip <= run_lo).all() else 0.0)
        hi = hi_l.sum() - (min(skip - run_hi) if (skip >= run_hi).all() else 0.0)
        return self.intercept_ + float(lo), self.intercept_ + float(hi)

    def naive_predict(self, X) -> np.ndarray:
        """The baseline: isolated layer times summed, plus the fixed parts."""
        return self.fixed_ms + self._sums(X).sum(1)

    def layer_table_ms(self, spec) -> dict:
        """Per-layer tables for router training: attention [L, n_heads], MLP [L, n_widths] in ms, the
        effective costs this model predicts with, plus the fixed part (intercept)."""
        import torch

        heads, widths = self._choices()
        Ae, Me = self._effective()
        for l in range(spec.num_layers):
            for h in spec.head_counts[l]:
                self._cell_ms(l, spec.mlp_widths[l][-1], h)
            for w in spec.mlp_widths[l]:
                self._cell_ms(l, w, spec.head_counts[l][-1])
        attn = torch.tensor([[Ae[l, heads[l].index(h)] for h in spec.head_counts[l]] for l in range(spec.num_layers)])
        mlp = torch.tensor([[Me[l, widths[l].index(w)] for w in spec.mlp_widths[l]] for l in range(spec.num_layers)])
        out = {"attn_ms": attn, "mlp_ms": mlp, "fixed_ms": self.intercept_}
        if self.depth:  # what a skipped layer costs (0 plus what the end-to-end configs taught)
            out["skip_ms"] = torch.tensor([Ae[l, 0] + Me[l, 0] for l in range(spec.num_layers)])
        return out

    # ---- plain-JSON persistence ---------------------------------------------------------------
    def to_dict(self) -> dict:
        check_is_fitted(self)
        return {
            "attn_table": {str(l): {str(k): v for k, v in t.items()} for l, t in self.attn_table.items()},
            "mlp_table": {str(l): {str(k): v for k, v in t.items()} for l, t in self.mlp_table.items()},
            "fixed_ms": self.fixed_ms,
            **({"layer_table": {str(l): float(v) for l, v in self.layer_table.items()}} if self.depth else {}),
            **({"bridge_table": {str(l): float(v) for l, v in self.bridge_table.items()}} if self.bridge_table else {}),
            "form_": self.form_, "alpha_": self.alpha_,
            "coef_": list(map(float, self.coef_)),
            "intercept_": self.intercept_,
            "host_ms_": list(map(float, self.host_ms_)),
            "delta_attn_": np.nan_to_num(self.delta_attn_).tolist(),
            "delta_mlp_": np.nan_to_num(self.delta_mlp_).tolist(),
            "cv_mape_pct_": self.cv_mape_pct_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        m = cls(
            attn_table={int(l): {int(k): float(v) for k, v in t.items()} for l, t in d["attn_table"].items()},
            mlp_table={int(l): {int(k): float(v) for k, v in t.items()} for l, t in d["mlp_table"].items()},
            fixed_ms=float(d["fixed_ms"]),
            layer_table={int(l): float(v) for l, v in d["layer_table"].items()} if d.get("layer_table") else None,
            bridge_table={int(l): float(v) for l, v in d["bridge_table"].items()} if d.get("bridge_table") else None,
        )
        m.coef_ = np.asarray(d["coef_"], dtype=float)
        m.intercept_ = float(d["intercept_"])
        if m.coef_.shape != (2,) or not np.isfinite(m.coef_).all():
            raise ValueError(f"coef_ must be two finite numbers (attention, MLP), got {d['coef_']!r}")
        m.form_ = d.get("form_", "scaled")
        if m.form_ not in FORMS:
            raise ValueError(f"form_ must be one of {FORMS}, got {m.form_!r}")
        m.alpha_ = d.get("alpha_")
        m.host_ms_ = np.asarray(d.get("host_ms_", [0.0, 0.0]), dtype=float)
        A, M = m._priors()
        m.delta_attn_ = np.asarray(d.get("delta_attn_", np.zeros_like(A)), dtype=float)
        m.delta_mlp_ = np.asarray(d.get("delta_mlp_", np.zeros_like(M)), dtype=float)
        if m.delta_attn_.shape != A.shape or m.delta_mlp_.shape != M.shape:
            raise ValueError("delta tables do not match the profiled choices")
        m.cv_mape_pct_ = d.get("cv_mape_pct_", {})
        return m


def encode(configs: list[SubnetConfig]) -> np.ndarray:
    """[n, 2L]: MLP widths of layers 0..L-1, then head counts; a skipped layer is 0 in both."""
    out = []
    for c in configs:
        sk = set(c.skip)
        out.append([0 if l in sk else w for l, w in enumerate(c.mlp_width)]
                   + [0 if l in sk else h for l, h in enumerate(c.heads)])
    return np.asarray(out, dtype=np.int64)


def tables_from_profile(layers, regime_key: str) -> tuple[dict, dict, float]:
    """Isolated per-layer times of one regime: drift-corrected by the sweep's anchors when the profile
    has them (`latency_ms_corrected`), else the plain medians."""
    d = layers[(layers["regime"] == regime_key) & (~layers["anchor"]) & (layers["status"] == "ok")]
    col = "latency_ms_corrected" if "latency_ms_corrected" in d.columns else "latency_ms_median"
    attn, mlp = {}, {}
    for layer, kind, width, ms in zip(d["layer"], d["kind"], d["width"], d[col]):
        if kind == "attn":
            attn.setdefault(int(layer), {})[int(width)] = float(ms)
        elif kind == "mlp":
            mlp.setdefault(int(layer), {})[int(width)] = float(ms)
    fixed = float(d[d["kind"].isin(["embed", "head"])][col].sum())
    return attn, mlp, fixed


def layer_table_from_profile(layers, regime_key: str, kind: str = "layer") -> dict | None:
    """{layer: isolated ms of the whole decoder layer at full width} of one regime (drift-corrected
    like the other cells), or None when the profile has no whole-layer cells (made before depth);
    `kind` "bridge": the layers' linear bridges likewise (None: no bridge cells)."""
    d = layers[(layers["regime"] == regime_key) & (~layers["anchor"]) & (layers["status"] == "ok")
               & (layers["kind"] == kind)]
    col = "latency_ms_corrected" if "latency_ms_corrected" in d.columns else "latency_ms_median"
    return {int(l): float(ms) for l, ms in zip(d["layer"], d[col])} or None


def error_metrics(y_true, y_pred) -> dict:
    from scipy.stats import spearmanr

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    ape = np.abs(y_pred - y_true) / y_true
    ranked = len(y_true) > 2 and np.ptp(y_true) > 0 and np.ptp(y_pred) > 0  # else no rank correlation exists
    rho = float(spearmanr(y_true, y_pred).statistic) if ranked else float("nan")
    return {"mape_pct": round(100 * float(ape.mean()), 3), "max_ape_pct": round(100 * float(ape.max()), 3),
            "spearman": round(rho, 4) if np.isfinite(rho) else None,  # None: too few or constant values to rank
            "n": int(len(y_true))}


class LatencyModels:
    """The fitted models of a run, per regime, for one device, and the identity of what they are: the
    profile they were fitted on (`profile_id`) and each regime's model (`model_id`)."""

    def __init__(self, device_name: str, models: dict[str, LatencyModel], profile_id: str | None = None,
                 model_ids: dict[str, str] | None = None):
        self.device_name = device_name
        self.models = models
        self.profile_id = profile_id
        self.model_ids = model_ids or {}

    @staticmethod
    def folder(run_root: str | Path) -> Path:
        """RUN/latency_model/, where `flextron fit` writes the models, their metrics and predictions."""
        return Path(run_root) / "latency_model"

    @classmethod
    def fitted(cls, run_root: str | Path) -> bool:
        """Whether `flextron fit` has written the run's models."""
        return (cls.folder(run_root) / MODEL_FILE).is_file()

    @classmethod
    def read_metrics(cls, run_root: str | Path) -> dict:
        """The fit's per-regime metrics (held-out error, noise floor, verdict); {} before a fit."""
        from flextron.rundir import read_json

        path = cls.folder(run_root) / METRICS_FILE
        return read_json(path, run_root) if path.is_file() else {}

    @classmethod
    def load(cls, run_root: str | Path) -> "LatencyModels":
        """The run's latency models; refused when the profile changed since they were fitted (a re-profile
        without a re-fit), naming `flextron fit`."""
        import hashlib

        from flextron.rundir import RunDir, corrupt_error, read_json, recover_swap
        from profiler.profile import profile_id

        run = RunDir(run_root)
        recover_swap(cls.folder(run.root))
        path = run.require("latency_model", MODEL_FILE) / MODEL_FILE
        d = read_json(path, run.root)
        try:
            regimes = {str(k): LatencyModel.from_dict(v) for k, v in d["regimes"].items()}
            ids = {str(k): hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
                   for k, v in d["regimes"].items()}
            fitted_on = d.get("profile_id")  # absent in models fitted before identities were recorded
            models = cls(str(d["device_name"]), regimes, fitted_on, ids)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise corrupt_error(path, run.root, e) from None
        if fitted_on is not None and profile_id(run.root) != fitted_on:
            raise FlextronError(
                f"{path} was fitted on another profile than {run / 'profile'} holds now (re-profiled since); "
                f"re-fit it with `flextron fit --run {run.root}`"
            )
        return models

    def get(self, regime_key: str) -> LatencyModel:
        if regime_key not in self.models:
            raise FlextronError(
                f"regime {regime_key} was not profiled on {self.device_name} (profiled: {sorted(self.models)}); "
                f"measure it with `flextron profile --regime {regime_key}` then `flextron fit`"
            )
        return self.models[regime_key]

    def resolve(self, regime: str | None) -> str:
        """A regime key from a full key, a short form (decode:b1:ctx256) or None when only one exists."""
        from flextron.spec import resolve_regime

        return resolve_regime(self.models, regime, f"profiled on {self.device_name}",
                              fix=f"measure it with `flextron profile --regime {regime}` then `flextron fit`")

    def predict(self, regime_key: str, configs: list[SubnetConfig]) -> np.ndarray:
        return self.get(regime_key).predict(encode(configs))

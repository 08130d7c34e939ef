"""`flextron fit`: predict a sub-network's end-to-end latency from its per-layer choices.

The per-layer terms are the sweep's isolated medians. Summing them misses what only the whole
model shows (launch gaps, norms and residual adds, cache effects between layers, fixed overhead),
so a non-negative linear correction is learned on part of the end-to-end set:

    latency_ms = intercept + a_attn * sum_l attn[l, heads_l] + a_mlp * sum_l mlp[l, width_l]

and its error is reported on end-to-end configs it never saw, beside the noise of the measurements
themselves (median CV of the end-to-end cells, CV of the drift anchors); a model that cannot rank
configs, or whose error is far above that noise, is fitted but warned about loudly. A regime with
failed cells (OOM, errors) is refused unless `--allow-errors`. Saved as plain JSON: loading never
unpickles anything.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

MODEL_FILE = "latency_model.json"
METRICS_FILE = "metrics.json"
# A fit is warned about when it ranks held-out configs worse than this (Spearman) ...
MIN_SPEARMAN = 0.5
# ... or when its held-out MAPE exceeds NOISE_FACTOR times the measurement noise and MAPE_FLOOR_PCT.
NOISE_FACTOR = 3.0
MAPE_FLOOR_PCT = 5.0


class LatencyModel(RegressorMixin, BaseEstimator):
    """scikit-learn regressor: X is [n, 2L] ints (MLP widths of layers 0..L-1, then head counts),
    y is measured end-to-end latency in ms.

    Args:
        attn_table: {layer: {heads: isolated attention ms}} for one regime and device.
        mlp_table: {layer: {width: isolated MLP ms}}.
        fixed_ms: isolated embedding + final norm + LM head time.
    """

    def __init__(self, attn_table=None, mlp_table=None, fixed_ms: float = 0.0):
        self.attn_table = attn_table
        self.mlp_table = mlp_table
        self.fixed_ms = fixed_ms

    def _sums(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.int64)
        L = len(self.mlp_table)
        if X.ndim != 2 or X.shape[1] != 2 * L:
            raise FlextronError(f"expected configs as [n, {2 * L}] (widths then heads), got shape {X.shape}")
        out = np.zeros((len(X), 2))
        for i, row in enumerate(X):
            for layer in range(L):
                w, h = int(row[layer]), int(row[L + layer])
                attn_ms, mlp_ms = self._cell_ms(layer, w, h)
                out[i, 0] += attn_ms
                out[i, 1] += mlp_ms
        return out

    def _cell_ms(self, layer: int, width: int, heads: int) -> tuple[float, float]:
        """Isolated (attention ms at `heads`, MLP ms at `width`) of one layer."""
        try:
            return self.attn_table[layer][heads], self.mlp_table[layer][width]
        except KeyError:
            raise FlextronError(
                f"layer {layer}: width {width} / heads {heads} was not profiled (profiled MLP widths "
                f"{sorted(self.mlp_table.get(layer, {}))}, heads {sorted(self.attn_table.get(layer, {}))}); "
                "re-run `flextron profile` with this ElasticSpec"
            ) from None

    def fit(self, X, y):
        from sklearn.linear_model import LinearRegression

        sums = self._sums(X)
        reg = LinearRegression(positive=True).fit(sums, np.asarray(y, dtype=float))
        self.coef_ = reg.coef_.astype(float)
        self.intercept_ = float(reg.intercept_)
        return self

    def predict(self, X) -> np.ndarray:
        return self.intercept_ + self._sums(X) @ self.coef_

    def predict_config(self, cfg: SubnetConfig) -> float:
        """Predicted end-to-end ms of one config."""
        return float(self.predict(encode([cfg]))[0])

    def range_ms(self, spec) -> tuple[float, float]:
        """(least, greatest) predicted end-to-end ms over every config of `spec`, exactly.

        The prediction is `intercept + sum_l (a_attn * attn[l, heads_l] + a_mlp * mlp[l, width_l])`:
        a sum of per-layer terms with independent choices, so its extremes are the sums of per-layer
        extremes (whatever the coefficients' signs). The narrowest config is not assumed fastest: a
        noisy profile can time a narrow width slower than a wider one.
        """
        if spec.num_layers != len(self.mlp_table):
            raise FlextronError(f"the spec has {spec.num_layers} layers, the latency model {len(self.mlp_table)}; "
                                "re-run `flextron profile` and `flextron fit` for this model")
        lo = hi = self.intercept_
        for layer in range(spec.num_layers):
            w_full, h_full = spec.mlp_widths[layer][-1], spec.head_counts[layer][-1]
            attn = [self.coef_[0] * self._cell_ms(layer, w_full, h)[0] for h in spec.head_counts[layer]]
            mlp = [self.coef_[1] * self._cell_ms(layer, w, h_full)[1] for w in spec.mlp_widths[layer]]
            lo += min(attn) + min(mlp)
            hi += max(attn) + max(mlp)
        return float(lo), float(hi)

    def naive_predict(self, X) -> np.ndarray:
        """The baseline: isolated layer times summed, plus the fixed parts."""
        return self.fixed_ms + self._sums(X).sum(1)

    def layer_table_ms(self, spec) -> dict:
        """Per-layer tables for router training: attention [L, n_heads], MLP [L, n_widths] in ms,
        scaled by the fitted corrections, plus the fixed part (intercept)."""
        import torch

        attn = torch.tensor([[self.coef_[0] * self.attn_table[l][h] for h in spec.head_counts[l]] for l in range(spec.num_layers)])
        mlp = torch.tensor([[self.coef_[1] * self.mlp_table[l][w] for w in spec.mlp_widths[l]] for l in range(spec.num_layers)])
        return {"attn_ms": attn, "mlp_ms": mlp, "fixed_ms": self.intercept_}

    # ---- plain-JSON persistence ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "attn_table": {str(l): {str(k): v for k, v in t.items()} for l, t in self.attn_table.items()},
            "mlp_table": {str(l): {str(k): v for k, v in t.items()} for l, t in self.mlp_table.items()},
            "fixed_ms": self.fixed_ms,
            "coef_": list(map(float, self.coef_)),
            "intercept_": self.intercept_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        m = cls(
            attn_table={int(l): {int(k): float(v) for k, v in t.items()} for l, t in d["attn_table"].items()},
            mlp_table={int(l): {int(k): float(v) for k, v in t.items()} for l, t in d["mlp_table"].items()},
            fixed_ms=float(d["fixed_ms"]),
        )
        m.coef_ = np.asarray(d["coef_"], dtype=float)
        m.intercept_ = float(d["intercept_"])
        if m.coef_.shape != (2,) or not np.isfinite(m.coef_).all():
            raise ValueError(f"coef_ must be two finite numbers (attention, MLP), got {d['coef_']!r}")
        return m


def encode(configs: list[SubnetConfig]) -> np.ndarray:
    return np.asarray([list(c.mlp_width) + list(c.heads) for c in configs], dtype=np.int64)


def tables_from_profile(layers, regime_key: str) -> tuple[dict, dict, float]:
    d = layers[(layers["regime"] == regime_key) & (~layers["anchor"]) & (layers["status"] == "ok")]
    attn, mlp = {}, {}
    for row in d.itertuples():
        if row.kind == "attn":
            attn.setdefault(int(row.layer), {})[int(row.width)] = float(row.latency_ms_median)
        elif row.kind == "mlp":
            mlp.setdefault(int(row.layer), {})[int(row.width)] = float(row.latency_ms_median)
    fixed = float(d[d["kind"].isin(["embed", "head"])]["latency_ms_median"].sum())
    return attn, mlp, fixed


def error_metrics(y_true, y_pred) -> dict:
    from scipy.stats import spearmanr

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    ape = np.abs(y_pred - y_true) / y_true
    ranked = len(y_true) > 2 and np.ptp(y_true) > 0 and np.ptp(y_pred) > 0  # else no rank correlation exists
    rho = float(spearmanr(y_true, y_pred).statistic) if ranked else float("nan")
    return {"mape_pct": round(100 * float(ape.mean()), 3), "max_ape_pct": round(100 * float(ape.max()), 3),
            "spearman": round(rho, 4) if np.isfinite(rho) else None,  # None: too few or constant values to rank
            "n": int(len(y_true))}


@dataclass(frozen=True)
class FitConfig:
    run: str = "runs/demo"
    holdout_frac: float = 0.5  # of the random heterogeneous configs; uniform ones always train
    seed: int = 0
    allow_errors: bool = False  # fit regimes with failed (OOM, error) cells on their ok cells

    def __post_init__(self):
        from flextron.rundir import check_finite

        check_finite("holdout_frac", self.holdout_frac, low=0, low_inclusive=False)
        if self.holdout_frac >= 1:
            raise FlextronError(f"--holdout-frac must be in (0, 1), got {self.holdout_frac}")
        check_finite("seed", self.seed, low=0)  # numpy's generator takes no negative seed
        if int(self.seed) != self.seed:
            raise FlextronError(f"--seed must be a whole number, got {self.seed}")


def measurement_noise(layers, e2e, regime_key: str) -> dict:
    """How noisy the regime's own measurements are, in %: the median CV of its end-to-end cells'
    samples, and the CV of its drift-anchor medians over the sweep (None with fewer than two)."""
    e = e2e[(e2e["regime"] == regime_key) & (e2e["status"] == "ok")]
    a = layers[(layers["regime"] == regime_key) & layers["anchor"] & (layers["status"] == "ok")]["latency_ms_median"]
    e2e_cv = float(e["cv"].median()) if "cv" in e and e["cv"].notna().any() else float("nan")
    anchor_cv = float(a.std() / a.mean()) if len(a) > 1 else float("nan")
    return {"e2e_median_cv_pct": round(100 * e2e_cv, 3) if np.isfinite(e2e_cv) else None,
            "anchor_cv_pct": round(100 * anchor_cv, 3) if np.isfinite(anchor_cv) else None}


def fit_warnings(metrics: dict) -> list[str]:
    """What a user must know before trusting a regime's fit: it cannot rank held-out configs, or its
    error is far above the noise of its own measurements."""
    rk, held = metrics["regime"], metrics["heldout"]
    out = []
    rho = held["spearman"]
    if rho is None or rho < MIN_SPEARMAN:
        how = (f"Spearman {rho} on {held['n']} configs, want >= {MIN_SPEARMAN}" if rho is not None else
               f"Spearman undefined: too few configs ({held['n']}) or one prediction for all")
        out.append(f"{rk}: the latency model cannot rank held-out sub-networks ({how}); budgets from it are not "
                   "trustworthy. Profile with more --min-time-ms and --e2e-random on a quiet device")
    noise = [v for v in (metrics["e2e_median_cv_pct"], metrics["anchor_cv_pct"]) if v is not None]
    limit = max(NOISE_FACTOR * max(noise, default=0.0), MAPE_FLOOR_PCT)
    if held["mape_pct"] > limit:
        e2e_cv, anchor_cv = (f"{v}%" if v is not None else "n/a" for v in (metrics["e2e_median_cv_pct"], metrics["anchor_cv_pct"]))
        out.append(f"{rk}: held-out error {held['mape_pct']:.3g}% is far above the measurement noise (end-to-end "
                   f"median CV {e2e_cv}, anchor CV {anchor_cv}): the "
                   "per-layer model does not explain end-to-end latency here (naive sum: "
                   f"{metrics['naive_sum_heldout']['mape_pct']:.3g}%). Check the profile for drift or throttling "
                   "and profile again before searching under budgets")
    return out


def fit_regime(layers, e2e, regime_key: str, holdout_frac: float, seed: int) -> tuple[LatencyModel, dict, dict]:
    attn, mlp, fixed = tables_from_profile(layers, regime_key)
    rows = e2e[(e2e["regime"] == regime_key) & (e2e["status"] == "ok")]
    if not attn or rows.empty:
        raise FlextronError(f"regime {regime_key} has no usable layer or end-to-end cells; re-run `flextron profile`")
    configs = [SubnetConfig.from_json(c) for c in rows["config"]]
    # Only with failed layer cells (fit --allow-errors): configs using one have no per-layer terms.
    usable = np.array([all(h in attn.get(l, {}) and w in mlp.get(l, {}) for l, (w, h) in enumerate(zip(c.mlp_width, c.heads)))
                       for c in configs], bool)
    rows, configs = rows[usable], [c for c, u in zip(configs, usable) if u]
    y = rows["latency_ms_median"].to_numpy()
    uniform = rows["uniform"].to_numpy(bool)
    rng = np.random.default_rng(seed)
    hetero = np.flatnonzero(~uniform)
    rng.shuffle(hetero)
    n_test = int(round(len(hetero) * holdout_frac))
    if n_test < 2:
        raise FlextronError(f"regime {regime_key}: too few heterogeneous end-to-end configs to hold out; "
                            "re-run `flextron profile --e2e-random 16` or more")
    test = hetero[:n_test]
    train = np.setdiff1d(np.arange(len(rows)), test)
    X = encode(configs)
    model = LatencyModel(attn, mlp, fixed).fit(X[train], y[train])
    metrics = {
        "regime": regime_key,
        "train_configs": int(len(train)),
        "heldout": error_metrics(y[test], model.predict(X[test])),
        "naive_sum_heldout": error_metrics(y[test], model.naive_predict(X[test])),
        **measurement_noise(layers, e2e, regime_key),
        "coef_attn": float(model.coef_[0]), "coef_mlp": float(model.coef_[1]), "intercept_ms": model.intercept_,
        "heldout_keys": [configs[i].key for i in test],
        "configs_without_layer_cells": int((~usable).sum()),
    }
    metrics["warnings"] = fit_warnings(metrics)
    held = np.zeros(len(rows), bool)
    held[test] = True
    preds = {"regime": regime_key, "config_key": [c.key for c in configs], "measured_ms": y,
             "predicted_ms": model.predict(X), "naive_ms": model.naive_predict(X), "heldout": held}
    return model, metrics, preds


LAYER_COLUMNS = ["regime", "device_name", "anchor", "status", "kind", "layer", "width", "latency_ms_median"]
E2E_COLUMNS = ["regime", "device_name", "status", "config", "uniform", "latency_ms_median", "cv"]


def _corrupt(path: Path, run_root, why: str) -> FlextronError:
    from flextron.rundir import rebuild_command

    return FlextronError(f"{path} is corrupt ({why}); rebuild it with `{rebuild_command(run_root, path)}`")


def fit(cfg: FitConfig) -> dict:
    import pandas as pd

    from flextron.rundir import (RunDir, fresh_tmp_dir, read_json, read_parquet, recover_swap, require_columns,
                                 save_stage_config, swap_in, write_json_atomic, write_parquet_atomic)
    from profiler.sweep import DEVICE_FILE, E2E_FILE, LAYERS_FILE, cells_by_status, status_kind

    run = RunDir(cfg.run)
    prof = run.require("profile", LAYERS_FILE)
    if not (prof / E2E_FILE).is_file():
        raise FlextronError(f"{prof / E2E_FILE} is missing; run `flextron profile --run {run.root}` without --layers-only")
    layers = require_columns(read_parquet(prof / LAYERS_FILE, run.root), prof / LAYERS_FILE, LAYER_COLUMNS, run.root)
    e2e = require_columns(read_parquet(prof / E2E_FILE, run.root), prof / E2E_FILE, E2E_COLUMNS, run.root)
    device_path = run.require("profile", DEVICE_FILE) / DEVICE_FILE
    device = read_json(device_path, run.root)
    if not isinstance(device.get("device_name"), str):
        raise _corrupt(device_path, run.root, "no device_name")
    devices = set(layers["device_name"]) | set(e2e["device_name"])
    if len(devices) > 1:
        raise FlextronError(f"the profile mixes devices {sorted(devices)}; fit one device per run directory")
    t0 = time.perf_counter()
    regimes = sorted(set(layers["regime"]))
    by_status = cells_by_status([layers, e2e], regimes)
    models, metrics, preds = {}, {}, []
    for regime_key in regimes:
        counts = by_status[regime_key]
        failed = counts["oom"] + counts["error"]
        if failed:
            statuses = pd.concat([layers.loc[layers["regime"] == regime_key, "status"],
                                  e2e.loc[e2e["regime"] == regime_key, "status"]])
            example = next(s for s in statuses if status_kind(s) != "ok")
            what = (f"regime {regime_key}: {failed} of {sum(counts.values())} profiled cells failed "
                    f"({counts['oom']} oom, {counts['error']} error; e.g. {example!r})")
            if not cfg.allow_errors:
                raise FlextronError(
                    f"{what}; a model fitted around them would not know the configs that use them. Measure again with "
                    f"`flextron profile --run {run.root} {' '.join('--regime ' + r for r in regimes)} --restart` "
                    "(for oom: a smaller batch or context, or a device "
                    "with more memory), or pass --allow-errors to fit on the ok cells"
                )
        model, m, p = fit_regime(layers, e2e, regime_key, cfg.holdout_frac, cfg.seed)
        if failed:
            m["warnings"].insert(0, f"{what}; fitted on the ok cells (--allow-errors): configs using a failed layer "
                                    f"cell cannot be predicted ({m['configs_without_layer_cells']} measured configs "
                                    "were left out for that)")
        m["cells_by_status"] = counts
        models[regime_key] = model.to_dict()
        metrics[regime_key] = m
        preds.append(pd.DataFrame(p))
    warnings = [w for m in metrics.values() for w in m["warnings"]]
    for w in warnings:
        print(f"flextron fit: WARNING: {w}", file=sys.stderr)
    recover_swap(run / "latency_model")
    out = fresh_tmp_dir(run / "latency_model")  # swapped in whole: model, metrics and predictions always agree
    write_json_atomic(out / MODEL_FILE, {"device_name": device["device_name"], "device": device, "regimes": models})
    write_json_atomic(out / METRICS_FILE, metrics)
    write_parquet_atomic(pd.concat(preds, ignore_index=True), out / "predictions.parquet")
    save_stage_config(out / "fit_config.json", cfg)
    swap_in(out, run / "latency_model")
    return {
        "device": device["device_name"],
        **{k: {"heldout_mape_pct": m["heldout"]["mape_pct"], "heldout_max_ape_pct": m["heldout"]["max_ape_pct"],
               "spearman": m["heldout"]["spearman"], "naive_mape_pct": m["naive_sum_heldout"]["mape_pct"],
               "e2e_median_cv_pct": m["e2e_median_cv_pct"], "anchor_cv_pct": m["anchor_cv_pct"],
               "cells_by_status": m["cells_by_status"]}
           for k, m in metrics.items()},
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }


class LatencyModels:
    """The fitted models of a run, per regime, for one device."""

    def __init__(self, device_name: str, models: dict[str, LatencyModel]):
        self.device_name = device_name
        self.models = models

    @classmethod
    def load(cls, run_root: str | Path) -> "LatencyModels":
        from flextron.rundir import RunDir, read_json, recover_swap

        run = RunDir(run_root)
        recover_swap(run / "latency_model")
        path = run.require("latency_model", MODEL_FILE) / MODEL_FILE
        d = read_json(path, run.root)
        try:
            return cls(str(d["device_name"]), {str(k): LatencyModel.from_dict(v) for k, v in d["regimes"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _corrupt(path, run.root, f"{type(e).__name__}: {str(e)[:160]}") from None

    def get(self, regime_key: str) -> LatencyModel:
        if regime_key not in self.models:
            raise FlextronError(
                f"regime {regime_key} was not profiled on {self.device_name} (profiled: {sorted(self.models)}); "
                f"measure it with `flextron profile --regime {regime_key}` then `flextron fit`"
            )
        return self.models[regime_key]

    def resolve(self, regime: str | None) -> str:
        """A regime key from a full key, a short form (decode:b1:ctx256) or None when only one exists."""
        if not regime:
            if len(self.models) == 1:
                return next(iter(self.models))
            raise FlextronError(f"several regimes were profiled ({sorted(self.models)}); name one with --regime")
        if regime in self.models:
            return regime
        matches = [k for k in self.models if k.startswith(regime + ":")]
        if len(matches) == 1:
            return matches[0]
        return self.get(regime) and regime  # raises with the list of profiled regimes

    def predict(self, regime_key: str, configs: list[SubnetConfig]) -> np.ndarray:
        return self.get(regime_key).predict(encode(configs))

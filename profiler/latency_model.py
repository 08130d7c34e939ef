"""`flextron fit`: predict a sub-network's end-to-end latency from its per-layer choices.

The per-layer terms are the sweep's isolated medians. Summing them misses what only the whole
model shows (launch gaps, norms and residual adds, cache effects between layers, fixed overhead),
so a non-negative linear correction is learned on part of the end-to-end set:

    latency_ms = intercept + a_attn * sum_l attn[l, heads_l] + a_mlp * sum_l mlp[l, width_l]

and its error is reported on end-to-end configs it never saw. Saved as plain JSON: loading never
unpickles anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

MODEL_FILE = "latency_model.json"
METRICS_FILE = "metrics.json"


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
                try:
                    out[i, 0] += self.attn_table[layer][h]
                    out[i, 1] += self.mlp_table[layer][w]
                except KeyError:
                    raise FlextronError(
                        f"layer {layer}: width {w} / heads {h} was not profiled (profiled MLP widths "
                        f"{sorted(self.mlp_table[layer])}, heads {sorted(self.attn_table[layer])}); "
                        "re-run `flextron profile` with this ElasticSpec"
                    ) from None
        return out

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
    rho = spearmanr(y_true, y_pred).statistic if len(y_true) > 2 else float("nan")
    return {"mape_pct": round(100 * float(ape.mean()), 3), "max_ape_pct": round(100 * float(ape.max()), 3),
            "spearman": round(float(rho), 4), "n": int(len(y_true))}


@dataclass(frozen=True)
class FitConfig:
    run: str = "runs/demo"
    holdout_frac: float = 0.5  # of the random heterogeneous configs; uniform ones always train
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.holdout_frac < 1:
            raise FlextronError(f"--holdout-frac must be in (0, 1), got {self.holdout_frac}")


def fit_regime(layers, e2e, regime_key: str, holdout_frac: float, seed: int) -> tuple[LatencyModel, dict, dict]:
    attn, mlp, fixed = tables_from_profile(layers, regime_key)
    rows = e2e[(e2e["regime"] == regime_key) & (e2e["status"] == "ok")]
    if not attn or rows.empty:
        raise FlextronError(f"regime {regime_key} has no usable layer or end-to-end cells; re-run `flextron profile`")
    configs = [SubnetConfig.from_json(c) for c in rows["config"]]
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
        "coef_attn": float(model.coef_[0]), "coef_mlp": float(model.coef_[1]), "intercept_ms": model.intercept_,
        "heldout_keys": [configs[i].key for i in test],
    }
    held = np.zeros(len(rows), bool)
    held[test] = True
    preds = {"regime": regime_key, "config_key": [c.key for c in configs], "measured_ms": y,
             "predicted_ms": model.predict(X), "naive_ms": model.naive_predict(X), "heldout": held}
    return model, metrics, preds


def fit(cfg: FitConfig) -> dict:
    import pandas as pd

    from flextron.rundir import RunDir, save_stage_config, write_json_atomic
    from profiler.sweep import DEVICE_FILE, E2E_FILE, LAYERS_FILE

    run = RunDir(cfg.run)
    prof = run.require("profile", LAYERS_FILE)
    if not (prof / E2E_FILE).is_file():
        raise FlextronError(f"{prof / E2E_FILE} is missing; run `flextron profile --run {run.root}` without --layers-only")
    layers = pd.read_parquet(prof / LAYERS_FILE)
    e2e = pd.read_parquet(prof / E2E_FILE)
    devices = set(layers["device_name"]) | set(e2e["device_name"])
    if len(devices) > 1:
        raise FlextronError(f"the profile mixes devices {sorted(devices)}; fit one device per run directory")
    t0 = time.perf_counter()
    models, metrics, preds = {}, {}, []
    for regime_key in sorted(set(layers["regime"])):
        model, m, p = fit_regime(layers, e2e, regime_key, cfg.holdout_frac, cfg.seed)
        models[regime_key] = model.to_dict()
        metrics[regime_key] = m
        preds.append(pd.DataFrame(p))
    device = json.loads((prof / DEVICE_FILE).read_text())
    out = run / "latency_model"
    write_json_atomic(out / MODEL_FILE, {"device_name": device["device_name"], "device": device, "regimes": models})
    write_json_atomic(out / METRICS_FILE, metrics)
    pd.concat(preds, ignore_index=True).to_parquet(out / "predictions.parquet", index=False)
    save_stage_config(out / "fit_config.json", cfg)
    return {
        "device": device["device_name"],
        **{k: {"heldout_mape_pct": m["heldout"]["mape_pct"], "heldout_max_ape_pct": m["heldout"]["max_ape_pct"],
               "spearman": m["heldout"]["spearman"], "naive_mape_pct": m["naive_sum_heldout"]["mape_pct"]}
           for k, m in metrics.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }


class LatencyModels:
    """The fitted models of a run, per regime, for one device."""

    def __init__(self, device_name: str, models: dict[str, LatencyModel]):
        self.device_name = device_name
        self.models = models

    @classmethod
    def load(cls, run_root: str | Path) -> "LatencyModels":
        from flextron.rundir import RunDir

        path = RunDir(run_root).require("latency_model", MODEL_FILE) / MODEL_FILE
        d = json.loads(path.read_text())
        return cls(d["device_name"], {k: LatencyModel.from_dict(v) for k, v in d["regimes"].items()})

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

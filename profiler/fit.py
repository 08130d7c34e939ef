"""`flextron fit`: the latency model (profiler/latency_model.py) fitted to a run's profile, per regime.

With a profile measured in interleaved rounds, the targets are each config's ratio to the full model
in the same round times the full model's median, so the machine's drift during the profile is not
fitted. Layers of one shape share one isolated cost per choice (`pool_layers`).

Its error is reported on end-to-end configs it never saw, beside the profile's test-retest noise
floor (and the samples' CV): at the floor, the machine is the limit; far above it, the model is
wrong, and `fit` says so. A model that cannot rank held-out configs is fitted but warned about
loudly. A regime with failed cells (OOM, errors) is refused unless `--allow-errors`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig
from profiler.latency_model import (
    METRICS_FILE,
    MODEL_FILE,
    LatencyModel,
    encode,
    error_metrics,
    layer_table_from_profile,
    tables_from_profile,
)

# A fit is warned about when it ranks held-out configs worse than this (Spearman) ...
MIN_SPEARMAN = 0.5
# ... or when its held-out MAPE exceeds NOISE_FACTOR times the measurement noise and MAPE_FLOOR_PCT.
NOISE_FACTOR = 3.0
MAPE_FLOOR_PCT = 5.0
# A held-out error within this many times the noise floor (or this many %) is "at the floor".
VERDICT_FACTOR = 1.5
VERDICT_MIN_PCT = 1.0


@dataclass(frozen=True)
class FitConfig:
    run: str  #: the run directory (profiled); the model goes to RUN/latency_model/
    #: fraction of the random heterogeneous end-to-end configs held out to score the model, in (0, 1); the
    #: uniform configs always train
    holdout_frac: float = 0.5
    seed: int = 0  #: seed of the held-out split (a non-negative whole number)
    #: fit regimes with failed (OOM, error) cells on their ok cells, with a warning (without it: refused)
    allow_errors: bool = False

    def __post_init__(self):
        from flextron.rundir import check_finite

        check_finite("holdout_frac", self.holdout_frac, low=0, low_inclusive=False)
        if self.holdout_frac >= 1:
            raise FlextronError(f"--holdout-frac must be in (0, 1), got {self.holdout_frac}")
        check_finite("seed", self.seed, low=0, whole=True)  # numpy's generator takes no negative seed


def measurement_noise(layers, e2e, regime_key: str, floor: dict | None = None) -> dict:
    """How noisy the regime's own measurements are, in %: the profile's split-half test-retest noise
    floor of end-to-end medians and of ratios to the full model (`floor`, from noise.json), the
    median CV of the end-to-end cells' samples, and the CV of the drift-anchor medians."""
    e = e2e[(e2e["regime"] == regime_key) & (e2e["status"] == "ok")]
    a = layers[(layers["regime"] == regime_key) & layers["anchor"] & (layers["status"] == "ok")]["latency_ms_median"]
    e2e_cv = float(e["cv"].median()) if "cv" in e and e["cv"].notna().any() else float("nan")
    anchor_cv = float(a.std() / a.mean()) if len(a) > 1 else float("nan")
    floor = floor or {}
    return {"noise_floor_pct": floor.get("noise_floor_pct"),
            "ratio_noise_floor_pct": floor.get("ratio_noise_floor_pct"),
            "e2e_median_cv_pct": round(100 * e2e_cv, 3) if np.isfinite(e2e_cv) else None,
            "anchor_cv_pct": round(100 * anchor_cv, 3) if np.isfinite(anchor_cv) else None}


def noise_of_targets(metrics: dict) -> tuple[float | None, str]:
    """The noise the held-out error is compared with, and its name: the test-retest floor of what
    the model was fitted to (ratios to the full model, or medians), else the samples' median CV."""
    for key in ("ratio_noise_floor_pct", "noise_floor_pct", "e2e_median_cv_pct"):
        if metrics.get(key) is not None and (key != "ratio_noise_floor_pct"
                                             or metrics.get("target") == "ratio_to_full"):
            return metrics[key], key
    return None, "none"


def verdict(metrics: dict) -> str:
    """Which limits this model: the machine (its error is at the noise floor) or the model itself."""
    noise, name = noise_of_targets(metrics)
    mape = metrics["heldout"]["mape_pct"]
    if noise is None:
        return "no noise floor measured: re-profile to tell model error from machine noise"
    if mape <= max(VERDICT_FACTOR * noise, VERDICT_MIN_PCT):
        return f"at the noise floor ({mape:.3g}% vs {name} {noise:.3g}%): the machine is the limit"
    return f"above the noise floor ({mape:.3g}% vs {name} {noise:.3g}%): the model misses something"


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
                   "trustworthy. Profile with more --rounds and --e2e-random on a quiet device")
    noise, name = noise_of_targets(metrics)
    limit = max(NOISE_FACTOR * (noise or 0.0), MAPE_FLOOR_PCT)
    if held["mape_pct"] > limit:
        out.append(f"{rk}: held-out error {held['mape_pct']:.3g}% is far above the measurement noise ({name} "
                   f"{noise if noise is not None else 'n/a'}%): the model does not explain end-to-end latency here "
                   f"(naive sum: {metrics['naive_sum_heldout']['mape_pct']:.3g}%). Check the profile for drift or "
                   "throttling and profile again before searching under budgets")
    return out


def pool_layers(table: dict, groups: list[list[int]]) -> dict:
    """Each group of layers (identical shapes) given one cost per choice: the median of its layers'
    measured cells. Layers of one shape cost the same; what their isolated cells differ by is
    measurement noise, and a search that picks the layers whose cells happen to read cheapest buys
    latency that is not there (a knapsack over noisy per-layer costs selects exactly those errors)."""
    out = dict(table)  # layers in no group keep their own cells
    for g in (g for g in groups if g):
        if all(isinstance(table[l], dict) for l in g):
            keys = set.intersection(*(set(table[l]) for l in g))
            pooled = {k: float(np.median([table[l][k] for l in g])) for k in keys}
            for l in g:
                out[l] = {k: pooled.get(k, v) for k, v in table[l].items()}
        else:
            pooled = float(np.median([table[l] for l in g]))
            out.update({l: pooled for l in g})
    return out


def fit_regime(layers, e2e, regime_key: str, holdout_frac: float, seed: int,
               floor: dict | None = None, tie_layers: bool = True) -> tuple[LatencyModel, dict, dict]:
    attn, mlp, fixed = tables_from_profile(layers, regime_key)
    whole = layer_table_from_profile(layers, regime_key)
    if whole is not None and set(whole) != set(mlp):
        whole = None  # some whole-layer cells failed (--allow-errors): no depth rather than a partial one
    # layers with the same choices have the same shapes: one cost per choice (see pool_layers)
    groups: dict = {}
    for l in sorted(mlp):
        if l in attn:
            groups.setdefault((tuple(sorted(mlp[l])), tuple(sorted(attn[l]))), []).append(l)
    attn, mlp = pool_layers(attn, list(groups.values())), pool_layers(mlp, list(groups.values()))
    if whole is not None:
        whole = pool_layers(whole, [[l for l in g if l in whole] for g in groups.values()])
    # the linear bridges of the layers that have one (same shape in every layer: pooled the same way)
    bridges = layer_table_from_profile(layers, regime_key, kind="bridge") if whole is not None else None
    if bridges is not None:
        bridges = pool_layers(bridges, [[l for l in g if l in bridges] for g in groups.values()])
    rows = e2e[(e2e["regime"] == regime_key) & (e2e["status"] == "ok")]
    if not attn or rows.empty:
        raise FlextronError(f"regime {regime_key} has no usable layer or end-to-end cells; re-run `flextron profile`")
    configs = [SubnetConfig.from_json(c) for c in rows["config"]]
    # Only with failed layer cells (fit --allow-errors): configs using one have no per-layer terms.
    usable = np.array([all(h in attn.get(l, {}) and w in mlp.get(l, {})
                           for l, (w, h) in enumerate(zip(c.mlp_width, c.heads)) if l not in c.skip)
                       and (whole is not None or not c.skip) for c in configs], bool)
    rows, configs = rows[usable], [c for c, u in zip(configs, usable) if u]
    y, target = rows["latency_ms_median"].to_numpy(float), "latency_ms_median"
    if "ratio_to_full" in rows and rows["ratio_to_full"].notna().all():
        # Measured in interleaved rounds: each config relative to the full model in the same round,
        # times the full model's median, so the machine's drift over the profile is not fitted.
        # the full model is the config at every layer's widest choice (not a ratio that happens to be 1.0)
        is_full = np.array([not c.skip and all(w == max(mlp[l]) and h == max(attn[l])
                                               for l, (w, h) in enumerate(zip(c.mlp_width, c.heads))) for c in configs])
        full = rows[is_full]["latency_ms_median"]
        if len(full):
            y, target = rows["ratio_to_full"].to_numpy(float) * float(full.iloc[0]), "ratio_to_full"
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
    model = LatencyModel(attn, mlp, fixed, layer_table=whole, tie_layers=tie_layers,
                         bridge_table=bridges).fit(X[train], y[train])
    metrics = {
        "regime": regime_key,
        "target": target,
        "train_configs": int(len(train)),
        "heldout": error_metrics(y[test], model.predict(X[test])),
        "naive_sum_heldout": error_metrics(y[test], model.naive_predict(X[test])),
        **measurement_noise(layers, e2e, regime_key, floor),
        "form": model.form_, "alpha": model.alpha_, "cv_mape_pct": model.cv_mape_pct_,
        "coef_attn": float(model.coef_[0]), "coef_mlp": float(model.coef_[1]), "intercept_ms": model.intercept_,
        "host_ms": [float(v) for v in model.host_ms_],
        "heldout_keys": [configs[i].key for i in test],
        "depth": model.depth,
        "heldout_depth_configs": int(sum(bool(configs[i].skip) for i in test)),
        "configs_without_layer_cells": int((~usable).sum()),
    }
    metrics["verdict"] = verdict(metrics)
    metrics["warnings"] = fit_warnings(metrics)
    held = np.zeros(len(rows), bool)
    held[test] = True
    preds = {"regime": regime_key, "config_key": [c.key for c in configs], "measured_ms": y,
             "predicted_ms": model.predict(X), "naive_ms": model.naive_predict(X), "heldout": held}
    return model, metrics, preds


def fit(cfg: FitConfig) -> dict:
    import pandas as pd

    from flextron.rundir import (
        RunDir,
        rebuild,
        save_stage_config,
        write_json_atomic,
        write_parquet_atomic,
    )
    from profiler.profile import Profile, profile_id
    from profiler.sweep import cells_by_status, status_kind

    run = RunDir(cfg.run)
    profile = Profile.load(run.root)
    layers, e2e, device, noise = profile.layers, profile.e2e, profile.device, profile.noise
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
        model, m, p = fit_regime(layers, e2e, regime_key, cfg.holdout_frac, cfg.seed, noise.get(regime_key))
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
    with rebuild(run / "latency_model") as out:  # swapped in whole: model, metrics and predictions always agree
        write_json_atomic(out / MODEL_FILE, {"device_name": device["device_name"], "device": device,
                                             "regimes": models, "profile_id": profile_id(run.root)})
        write_json_atomic(out / METRICS_FILE, metrics)
        write_parquet_atomic(pd.concat(preds, ignore_index=True), out / "predictions.parquet")
        save_stage_config(out / "fit_config.json", cfg)
    return {
        "device": device["device_name"],
        **{k: {"heldout_mape_pct": m["heldout"]["mape_pct"], "heldout_max_ape_pct": m["heldout"]["max_ape_pct"],
               "spearman": m["heldout"]["spearman"], "naive_mape_pct": m["naive_sum_heldout"]["mape_pct"],
               "noise_floor_pct": m["noise_floor_pct"], "ratio_noise_floor_pct": m["ratio_noise_floor_pct"],
               "verdict": m["verdict"], "form": m["form"],
               "e2e_median_cv_pct": m["e2e_median_cv_pct"], "anchor_cv_pct": m["anchor_cv_pct"],
               "cells_by_status": m["cells_by_status"]}
           for k, m in metrics.items()},
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 2),
    }

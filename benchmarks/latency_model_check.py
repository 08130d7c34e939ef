"""How well a run's latency model predicts the configs verify measured: an independent test set.

The fit's held-out score uses configs of the profile's own end-to-end set (random widths, random
skips). The configs a search picks are a different population (mostly full width, some layers
skipped, a few cut), chosen *because* the model predicts them cheap, so its errors on them are what
decides whether a lookup row holds. Verify measured each of them in interleaved rounds beside the full
model; this script refits the latency model from the run's profile (tied per-layer terms, the default,
and untied, the model before session 10) and prints, per regime, the MAPE, the bias (mean signed
error: negative = predicted faster than measured) and the Spearman rank correlation of the predicted
ratio to the full model against verify's measured ratio (as verify computes it).

    PYTHONPATH=. python benchmarks/latency_model_check.py runs/<run>
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from flextron.spec import SubnetConfig
from profiler.fit import fit_regime
from profiler.interleaved import FULL
from profiler.latency_model import encode
from profiler.rounds import per_round


def measured_ratios(samples: pd.DataFrame) -> pd.Series:
    """Each config's ratio to the full model as verify computes it: the median over rounds of its
    per-round ratio (`profiler.rounds.per_round`)."""
    return per_round(samples, FULL).groupby("key")["ratio_to_full"].median()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run directory that went through `flextron verify`")
    args = ap.parse_args(argv)
    run = Path(args.run)
    layers = pd.read_parquet(run / "profile" / "layers.parquet")
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    samples = pd.read_parquet(run / "verify" / "samples.parquet")
    device = json.loads((run / "profile" / "device.json").read_text())
    print(f"run {run}  device {device.get('device_name')}  torch {device.get('torch')}  "
          f"git {str(device.get('git_hash'))[:7]} (profile)")
    configs = {}
    for path in sorted((run / "search").glob("*/*/trials.parquet")):
        for text in pd.read_parquet(path)["config"]:
            c = SubnetConfig.from_json(text)
            configs[c.key] = c
    for text in pd.read_parquet(run / "verify" / "uniform.parquet")["config"]:
        c = SubnetConfig.from_json(text)
        configs[c.key] = c
    for regime in sorted(samples["regime"].unique()):
        ratios = measured_ratios(samples[samples["regime"] == regime])
        keys = [k for k in ratios.index if k in configs]
        subs = [configs[k] for k in keys]
        meas = ratios[keys].to_numpy(float)
        uniform = np.array([not c.skip and c.is_uniform() for c in subs])
        print(f"\n{regime}: {len(keys)} configs verify measured ({int((~uniform).sum())} non-uniform); "
              "prediction / measurement - 1:")
        for tie in (True, False):
            model, metrics, _ = fit_regime(layers, e2e, regime, 0.5, 0, tie_layers=tie)
            full = model.predict_config(SubnetConfig(*_full(model)))
            err = model.predict(encode(subs)) / full / meas - 1
            parts = []
            for name, sel in (("non-uniform", ~uniform), ("uniform", uniform), ("all", np.ones_like(uniform))):
                if sel.sum() > 2:
                    rho = spearmanr(model.predict(encode([s for s, k in zip(subs, sel) if k])), meas[sel]).statistic
                    parts.append(f"{name} n={int(sel.sum())} MAPE {100 * np.abs(err[sel]).mean():.2f}% "
                                 f"bias {100 * err[sel].mean():+.2f}% Spearman {rho:.3f}")
            print(f"  {'tied  ' if tie else 'untied'} (fit held-out MAPE {metrics['heldout']['mape_pct']:.2f}%, "
                  f"CV {min(metrics['cv_mape_pct'].values()):.2f}%): " + "; ".join(parts))
    return 0


def _full(model) -> tuple:
    """(widths, heads) of the full model, from the latency model's profiled choices."""
    L = len(model.mlp_table)
    return (tuple(max(model.mlp_table[l]) for l in range(L)), tuple(max(model.attn_table[l]) for l in range(L)))


if __name__ == "__main__":
    sys.exit(main())

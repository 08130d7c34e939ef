"""What measuring only alternate MLP widths in the quality table costs (`flextron quality --mlp-table`).

Reads finished runs (each with a quality table that measured every MLP width, and the quality stage's
real evaluations), writes nothing: for each run, the table's MLP deltas are kept at the widths the
`alternate` table measures (`flextron.quality_model.measured_mlp`) and filled in between them as the
stage fills them (`fill_mlp`); the quality model is refitted on the run's own fitted configs and scored
on its held-out ones, as `flextron quality` splits them. Prints per run the held-out Spearman with the
full and the filled table, the mean absolute difference of the filled entries, and the share of the
table's single-layer changes left to measure.

    PYTHONPATH=. python benchmarks/mlp_table.py runs/<run> [runs/<run> ...]
"""

import argparse
import dataclasses

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from flextron.quality_model import QualityModel, QualityTable, fill_mlp, measured_mlp
from flextron.spec import ElasticSpec, SubnetConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    diffs = []
    for run in args.runs:
        spec = ElasticSpec.load(f"{run}/elastic/elastic_spec.json")
        table = QualityTable.load(f"{run}/quality/elastic/quality_table.json")
        if table.key.get("mlp_table", "all") != "all":
            print(f"{run}: its table measured alternate widths only; skipped")
            continue
        ev = pd.read_parquet(f"{run}/quality/elastic/evaluations.parquet")
        cfgs = [SubnetConfig.from_json(c) for c in ev["config"]]
        y, held = ev["loss"].to_numpy(), ev["heldout"].to_numpy()
        fit = [c for c, h in zip(cfgs, held) if not h]
        n = len(spec.mlp_widths[0])
        keep = measured_mlp(n, "alternate")
        filled = dataclasses.replace(table, mlp=tuple(tuple(fill_mlp(list(m), keep)) for m in table.mlp))
        err = np.mean([abs(a - b) for m0, m1 in zip(table.mlp, filled.mlp) for i, (a, b) in enumerate(zip(m0, m1))
                       if i not in keep and i < n - 1])
        rho = {}
        for name, t in (("full", table), ("alternate", filled)):
            p = QualityModel(t, spec).fit(fit, list(y[~held])).predict(cfgs)
            rho[name] = spearmanr(y[held], p[held]).statistic
        changes = 1 + (n - 1) + (len(spec.head_counts[0]) - 1)
        diffs.append(rho["alternate"] - rho["full"])
        print(f"{run}: held-out Spearman full table {rho['full']:.4f}, alternate {rho['alternate']:.4f} "
              f"({int(held.sum())} held-out configs); filled entries {err:.4f} nats from measured on average; "
              f"{changes - (n - 1 - len(keep))} of {changes} changes a layer measured")
    if diffs:
        print(f"Spearman alternate - full: median {np.median(diffs):+.4f}, range {min(diffs):+.4f} to {max(diffs):+.4f}"
              f" over {len(diffs)} runs")


if __name__ == "__main__":
    main()

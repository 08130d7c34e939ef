"""Other forms of the quality model, refitted on a finished run's own evaluations: do any rank the
held-out configs better than the forms `flextron quality` chooses from?

Reads RUN/quality/elastic/ (the per-layer table and the evaluations, split into fitted and held out as
the stage split them) and prints the held-out Spearman rank correlation of the stage's three forms
(additive, scaled, scaled_counts, each fitted alone) and of plain linear fits on the table's six sums
(MLP, heads and skip deltas, and the three counts of changed layers), with squares of the delta sums,
each on the loss increase and on its log.

    PYTHONPATH=. python benchmarks/quality_model_forms.py runs/<run>
"""

import sys

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.linear_model import LinearRegression

from flextron.quality_model import QualityModel, QualityTable
from flextron.spec import ElasticSpec, SubnetConfig


def main(run: str) -> None:
    spec = ElasticSpec.load(f"{run}/elastic/elastic_spec.json")
    table = QualityTable.load(f"{run}/quality/elastic/quality_table.json")
    d = pd.read_parquet(f"{run}/quality/elastic/evaluations.parquet")
    cfgs = [SubnetConfig.from_json(c) for c in d["config"]]
    y, te = d["loss"].to_numpy(float), d["heldout"].to_numpy(bool)
    tr = ~te
    print(f"run {run}: {int(tr.sum())} configs fitted on, {int(te.sum())} held out")
    for form in ("additive", "scaled", "scaled_counts"):
        p = QualityModel(table, spec, forms=(form,)).fit([c for c, k in zip(cfgs, tr) if k], y[tr]).predict(cfgs)
        print(f"  {form:14s} held-out Spearman {spearmanr(p[te], y[te]).statistic:.4f}, "
              f"mean abs error {np.abs(p[te] - y[te]).mean():.4f} nats")
    S = table.sums(spec, cfgs)
    sums = S[:, :3].sum(1, keepdims=True)
    for name, X in (("linear on the six sums", S[:, :6]),
                    ("  + squares of the delta sums", np.hstack([S[:, :6], sums ** 2, S[:, 2:3] ** 2]))):
        for target in ("loss increase", "log loss increase"):
            t = y - table.base_loss
            t = np.log(np.maximum(t, 1e-3)) if target.startswith("log") else t
            p = LinearRegression().fit(X[tr], t[tr]).predict(X)
            print(f"  {name:30s} on the {target:18s} held-out Spearman {spearmanr(p[te], y[te]).statistic:.4f}")


if __name__ == "__main__":
    for run in sys.argv[1:]:
        main(run)

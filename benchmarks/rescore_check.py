"""Does the search's ranking on its few evaluation windows pick the config that is best on many more?

For each budget of a finished run's search, the 4 best distinct configs by the search's own loss
(8 x 128 validation tokens by default) are evaluated again on 24 and on 64 windows of the same split
(the first windows are the search's own: the sets are nested) and printed as perplexities
search / 24 windows / 64 windows with their seed's name. When the first column's order agrees with the
last's, a re-score of each budget's best few on more tokens would change no pick. The evaluations go
to a cache beside the run (`--cache`), never into the run.

    PYTHONPATH=. python benchmarks/rescore_check.py runs/<run> [--cache /tmp/rescore_cache.jsonl]
"""

import argparse
import math

import pandas as pd

from flextron.elastic import ElasticModel
from flextron.rundir import RunDir
from flextron.spec import SubnetConfig
from search.quality import QualityEvaluator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--cache", default="/tmp/rescore_cache.jsonl")
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    run = RunDir(args.run)
    wname, wdir = run.weights("elastic")
    elastic = ElasticModel.load(wdir, device="cpu")
    corpus, tag = run.corpus(""), run.weights_tag(wname)
    more = [QualityEvaluator(elastic, args.cache, n, 128, corpus=corpus, tag=tag) for n in (24, 64)]
    trials = pd.read_parquet(next((run.root / "search").glob(f"*/{wname}/trials.parquet")))
    trials = trials[trials["evaluated"]].drop_duplicates(["budget_ms", "config"])
    for frac, g in trials.groupby("budget_frac"):
        rows = []
        for _, r in g.sort_values("loss").head(args.top).iterrows():
            c = SubnetConfig.from_json(r["config"])
            rows.append(f"{math.exp(r['loss']):.1f}/" + "/".join(f"{math.exp(e.loss(c)):.1f}" for e in more)
                        + f" {r['source']}")
        print(f"budget {frac}: " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    main()

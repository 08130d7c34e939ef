"""The depth path against single-layer deltas: validation perplexity of the full model with its first k
layers skipped in the order of the run's greedy depth path (`flextron quality`) and in the order of
their single-layer loss deltas (the same quality table), k = 2, 4, 6, ... up to the path's length (or --k).

    python benchmarks/depth_path.py --run runs/demo [--windows 64] [--k 11 12 13]
"""

import argparse
import math

import torch

from flextron.data import token_windows
from flextron.elastic import ElasticModel
from flextron.evaluate import mean_loss
from flextron.quality_model import TABLE_FILE, QualityTable, quality_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--weights", default="elastic")
    ap.add_argument("--windows", type=int, default=64, help="validation windows of 256 tokens")
    ap.add_argument("--k", type=int, nargs="*", help="numbers of skipped layers (default: 2, 4, ... the path's length)")
    args = ap.parse_args()
    el = ElasticModel.load(f"{args.run}/{args.weights}")
    table = QualityTable.load(quality_dir(args.run, args.weights) / TABLE_FILE)
    if not table.path:
        raise SystemExit(f"{args.run}'s quality table has no depth path; run `flextron quality --run {args.run}`")
    spec = el.spec
    windows = token_windows(el.tokenizer, el.adapter, "validation", 256, args.windows)
    solo = table.solo_ranking()
    full = math.exp(mean_loss(el, spec.full(), windows))
    print(f"{args.run}: depth path {list(table.path)} (measured in {table.path_seconds} s on the table's "
          f"{table.key.get('calibration')} calibration tokens); single-layer order {solo[:len(table.path)]}")
    print(f"full model ppl {full:.2f} on {windows[:, 1:].numel()} validation tokens "
          f"({torch.get_num_threads()} threads)")
    print(f"{'k':>3s} {'path: ppl':>10s} {'layers':>32s} {'single deltas: ppl':>19s} {'layers':>32s}")
    for k in args.k or range(2, len(table.path) + 1, 2):
        if not 0 < k <= len(table.path):
            raise SystemExit(f"--k {k}: the depth path has {len(table.path)} layers")
        p = math.exp(mean_loss(el, spec.depth(table.path[:k]), windows))
        s = math.exp(mean_loss(el, spec.depth(solo[:k]), windows))
        print(f"{k:3d} {p:10.1f} {str(sorted(table.path[:k])):>32s} {s:19.1f} {str(sorted(solo[:k])):>32s}", flush=True)


if __name__ == "__main__":
    main()

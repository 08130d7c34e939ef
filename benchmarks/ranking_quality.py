"""Value of importance ranking: validation perplexity of SmolLM2 at full width and uniform 90/75/50%
MLP width, with importance-ranked slicing and with first-k slicing (the stored order).

    python benchmarks/ranking_quality.py [--model smollm2-135m] [--windows 32]
"""

import argparse
import json

from flextron.convert import ConvertConfig, convert
from flextron.evaluate import EvalConfig, evaluate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-ranking")
    args = ap.parse_args()
    results = {}
    for ranked in (True, False):
        run = f"{args.out}/{'ranked' if ranked else 'firstk'}"
        convert(ConvertConfig(model=args.model, out=run, rank=ranked))
        for c in ("full", "uniform:0.9", "uniform:0.75", "uniform:0.5"):
            results[(ranked, c)] = evaluate(EvalConfig(run=run, config=c, windows=args.windows))
    tokens = results[(True, "full")]["tokens"]
    print(f"{args.model} validation perplexity ({tokens} tokens, wiki validation split)")
    print(f"{'config':14s} {'ranked':>10s} {'first-k':>10s}")
    for c in ("full", "uniform:0.9", "uniform:0.75", "uniform:0.5"):
        print(f"{c:14s} {results[(True, c)]['ppl']:10.2f} {results[(False, c)]['ppl']:10.2f}")
    print(json.dumps({f"{'ranked' if r else 'firstk'}:{c}": v["ppl"] for (r, c), v in results.items()}))


if __name__ == "__main__":
    main()

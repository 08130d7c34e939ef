"""Value of importance ranking: validation perplexity of SmolLM2 at full width and uniform 90/75/50%
MLP width, with neurons ranked by each `--mlp-score` (output: activation RMS x down_proj column
norm; activation: mean |activation|) and with first-k slicing (the stored order).

    python benchmarks/ranking_quality.py [--model smollm2-135m] [--windows 32]
"""

import argparse
import json

from flextron.convert import ConvertConfig, convert
from flextron.elastic import MLP_SCORES
from flextron.evaluate import EvalConfig, evaluate

CONFIGS = ("full", "uniform:0.9", "uniform:0.75", "uniform:0.5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default="runs/bench-ranking")
    args = ap.parse_args()
    orders = {score: dict(rank=True, mlp_score=score) for score in MLP_SCORES}
    orders["first-k"] = dict(rank=False)
    results = {}
    for name, kw in orders.items():
        run = f"{args.out}/{name}"
        convert(ConvertConfig(model=args.model, out=run, **kw))
        for c in CONFIGS:
            results[(name, c)] = evaluate(EvalConfig(run=run, config=c, windows=args.windows))
    tokens = results[("first-k", "full")]["tokens"]
    print(f"{args.model} validation perplexity ({tokens} tokens, wiki validation split), MLP neurons ranked by")
    print(f"{'config':14s}" + "".join(f"{name:>12s}" for name in orders))
    for c in CONFIGS:
        print(f"{c:14s}" + "".join(f"{results[(name, c)]['ppl']:12.2f}" for name in orders))
    print(json.dumps({f"{name}:{c}": v["ppl"] for (name, c), v in results.items()}))


if __name__ == "__main__":
    main()

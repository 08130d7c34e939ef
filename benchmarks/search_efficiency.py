"""Search efficiency: at equal numbers of quality evaluations, Optuna TPE against random search,
per budget, on one run (its latency model and quality cache). Prints best validation loss per
budget after each count of evaluations, the proposals over budget (repaired or rejected, never evaluated
as proposed), the evaluations of configs predicted over budget (counted), and the device.

    python benchmarks/search_efficiency.py --run runs/demo --budget-frac 0.7 0.8 0.9 --trials 24 --seeds 0 1 2 3 4

The searches run in a copy of the run (`--out`), so the run's own search results stay untouched.
"""

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from search.optuna_search import SearchConfig, search


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--regime", default="")
    ap.add_argument("--budget-frac", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    ap.add_argument("--trials", type=int, default=24)  # the search's own default
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--out", default="runs/bench-efficiency")
    args = ap.parse_args()
    src, run = Path(args.run), Path(args.out)
    for stage in ("elastic", "trained", "profile", "latency_model"):
        if (src / stage).is_dir() and not (run / stage).is_dir():
            shutil.copytree(src / stage, run / stage)
    cache = src / "search" / "quality_cache.jsonl"
    if cache.is_file() and not (run / "search" / cache.name).is_file():
        (run / "search").mkdir(parents=True, exist_ok=True)
        shutil.copy(cache, run / "search" / cache.name)  # shared evaluations: none is computed twice
    args.run = str(run)
    rows, over_budget = [], 0
    for sampler in ("tpe", "random"):
        for seed in args.seeds:
            prefix = f"bench-efficiency|{sampler}|seed{seed}"
            out = search(SearchConfig(run=args.run, regime=args.regime, budget_frac=tuple(args.budget_frac),
                                      trials=args.trials, sampler=sampler, seed=seed, study_prefix=prefix,
                                      skip_infeasible=True, weights=args.weights))
            t = pd.read_parquet(Path(out["results"]) / "trials.parquet")
            t = t[t["study"].str.startswith(prefix + "|")]  # the folder holds every sampler's and seed's studies
            # counted, not assumed: evaluated trials the latency model put over their budget (the quantile's tail
            # factor only lowers the bound, so this counts every one that could be over)
            over_budget += int((t["evaluated"] & (t["predicted_latency_ms"] > t["budget_ms"] + 1e-9)).sum())
            for b in t["budget_ms"].unique():
                g = t[(t.budget_ms == b) & t.evaluated]
                if g.empty:  # no feasible config found in the capped number of proposals
                    rows.append({"sampler": sampler, "seed": seed, "budget_ms": b, "best_loss": float("nan"),
                                 "best_at_half": float("nan"), "evaluated": 0})
                    continue
                g = g.sort_values("trial")
                curve = g["loss"].cummin().to_numpy()
                rows.append({"sampler": sampler, "seed": seed, "budget_ms": b, "best_loss": float(curve[-1]),
                             "best_at_half": float(curve[len(curve) // 2 - 1]), "evaluated": len(g)})
            print(f"{sampler} seed {seed}: {out['evaluated_trials']} evaluated, {out['infeasible_skipped']} proposals "
                  "not evaluated as proposed (over budget: repaired into a fitting config, or rejected)", flush=True)
    df = pd.DataFrame(rows)
    print(f"quality = validation loss of the run's weights ({args.weights}); "
          f"{args.trials} evaluations per budget; seeds {args.seeds}")
    print(
        f"{'budget ms':>10s} {'TPE best loss':>14s} {'random best':>12s} {'TPE @half':>10s} "
        f"{'random @half':>13s} {'TPE wins':>9s}"
    )
    summary = {}
    for b, g in df.groupby("budget_ms"):
        tp, rd = g[g.sampler == "tpe"], g[g.sampler == "random"]
        # a sampler that found no feasible config at all loses to one that did
        wins = int(
            sum(
                a < c or (c != c and a == a)
                for a, c in zip(tp.sort_values("seed").best_loss, rd.sort_values("seed").best_loss)
            )
        )
        print(
            f"{b:10.3f} {tp.best_loss.mean():14.4f} {rd.best_loss.mean():12.4f} {tp.best_at_half.mean():10.4f} "
            f"{rd.best_at_half.mean():13.4f} {wins:>5d}/{len(tp)}"
        )
        summary[f"{b:.4g}"] = {
            "tpe": round(float(tp.best_loss.mean()), 4),
            "random": round(float(rd.best_loss.mean()), 4),
            "tpe_wins": wins,
            "seeds": len(tp),
        }
    print(f"evaluations of configs the latency model predicts over their budget: {over_budget} (counted in the "
          "trials tables)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

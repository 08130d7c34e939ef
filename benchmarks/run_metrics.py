"""Print a finished run's own measurements that benchmarks/best_subnetwork.py does not: the latency model's
held-out error and noise floor, verify's noise floor and interference, each verified pick (predicted
against measured ratio), and every candidate the search evaluated: its prediction, verify's measured
ratio and rounds where verify measured it, its search-evaluation perplexity, layers skipped and cut.

    python benchmarks/run_metrics.py runs/bench-best9-0
"""

import json
import math
import sys

import pandas as pd

from flextron.spec import ElasticSpec, SubnetConfig
from profiler.interleaved import FULL
from profiler.rounds import describe_refine, per_round

run = sys.argv[1]
m = json.load(open(f"{run}/latency_model/metrics.json"))
for k, x in m.items():
    print(f"latency model {k}: held-out {x['heldout']}, profile ratio noise floor {x['ratio_noise_floor_pct']}%")
p = json.load(open(f"{run}/profile/noise.json"))
for k, x in p.items():
    if "refine" in x:
        print(f"profile {k}: rounds added toward the target floor: {describe_refine(x['refine'])}")
n = json.load(open(f"{run}/verify/noise.json"))
print("verify noise.json regimes:", json.dumps(n["regimes"]), "time cap hit:", n["time_cap_hit"],
      "stopped for futility:", n.get("stopped_for_futility"))
v = pd.read_parquet(f"{run}/verify/verified.parquet")
v["predicted_ratio"] = v["predicted_latency_ms"] / v["reference_full_ms"]
print(v[["budget_frac", "source", "predicted_ratio", "ratio", "ratio_hi", "verdict", "replacements_tried", "ppl"]]
      .round(3).to_string(index=False))

full = ElasticSpec.load(f"{run}/elastic/elastic_spec.json").full()
samples = pd.read_parquet(f"{run}/verify/samples.parquet")
first_rounds = json.load(open(f"{run}/verify/verify_config.json"))["rounds"]
per_key = samples[samples["key"] != FULL].groupby("key")["round"].agg(["min", "nunique"])
# the same configs one at a time (each config's rounds beyond the first round set alone with the full model)
alone = first_rounds + int(sum(n - first_rounds if lo == 0 else n for lo, n in zip(per_key["min"], per_key["nunique"])))
print(f"verify: {samples[samples['key'] == FULL]['round'].nunique()} rounds for {len(per_key)} configs "
      f"({int((per_key['min'] == 0).sum())} in the first {first_rounds}); one at a time the same configs take {alone}")
rt = per_round(samples, FULL)
measured, rounds = rt.groupby("key")["ratio_to_full"].median(), rt.groupby("key").size()
for path in sorted(__import__("pathlib").Path(run, "search").glob("*/*/trials.parquet")):
    t = pd.read_parquet(path)
    t = t[t["evaluated"]].assign(key=[SubnetConfig.from_json(c).key for c in t[t["evaluated"]]["config"]])
    print(f"\ncandidates of {path.parent.relative_to(run)} (ppl on the search's evaluation tokens):")
    for r in t.drop_duplicates(["budget_frac", "key"]).sort_values(["budget_frac", "loss"]).itertuples():
        c = SubnetConfig.from_json(r.config)
        cut = sum(1 for layer, (w, h) in enumerate(zip(c.mlp_width, c.heads))
                  if layer not in c.skip and (w, h) != (full.mlp_width[layer], full.heads[layer]))
        m = f"{measured[r.key]:.3f} ({rounds[r.key]:2d} rounds)" if r.key in measured else "not measured     "
        print(f"{r.budget_frac:.1f} {r.source:30s} predicted {r.predicted_latency_ms / r.reference_full_ms:.3f} "
              f"measured {m} ppl {math.exp(r.loss):12.1f} skipped {len(c.skip):2d} cut {cut:2d}")

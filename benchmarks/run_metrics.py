"""Print a finished run's own measurements that benchmarks/best_subnetwork.py does not: the latency model's
held-out error and noise floor, verify's noise floor and interference, and each verified pick (predicted
against measured ratio).

    python benchmarks/run_metrics.py runs/bench-best9-0
"""

import json
import sys

import pandas as pd

run = sys.argv[1]
m = json.load(open(f"{run}/latency_model/metrics.json"))
for k, x in m.items():
    print(f"latency model {k}: held-out {x['heldout']}, profile ratio noise floor {x['ratio_noise_floor_pct']}%")
n = json.load(open(f"{run}/verify/noise.json"))
print("verify noise.json regimes:", json.dumps(n["regimes"]), "time cap hit:", n["time_cap_hit"])
v = pd.read_parquet(f"{run}/verify/verified.parquet")
v["predicted_ratio"] = v["predicted_latency_ms"] / v["reference_full_ms"]
print(v[["budget_frac", "source", "predicted_ratio", "ratio", "ratio_hi", "verdict", "replacements_tried", "ppl"]]
      .round(3).to_string(index=False))

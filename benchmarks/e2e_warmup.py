"""Does an end-to-end config need untimed warm-up steps after another config ran in the same round?

Interleaved rounds (the full model and 13 configs: every fifth uniform one, 4 random, 4 that skip layers)
with no warm-up and 6 timed steps each: every step's latency over its own (config, round) median, by
step index. A first step slower than the rest is what warm-up steps would hide.

    PYTHONPATH=. python benchmarks/e2e_warmup.py RUN [--regime decode:b1:ctx256] [--rounds 8]
"""

import argparse

import pandas as pd

from flextron.devices import set_cpu_threads
from flextron.elastic import ElasticModel
from flextron.spec import Regime
from profiler.interleaved import InterleavedSession
from profiler.sweep import depth_configs, random_configs
from profiler.telemetry import Telemetry

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("--regime", default="decode:b1:ctx256")
ap.add_argument("--rounds", type=int, default=8)
ap.add_argument("--reps", type=int, default=6)
args = ap.parse_args()
set_cpu_threads("cpu", 0)
el = ElasticModel.load(f"{args.run}/elastic")
cfgs = el.spec.uniform_configs()[::5] + random_configs(el.spec, 4, 0) + depth_configs(el.spec, 4, 0)
with InterleavedSession(el, Regime.parse(args.regime), "cpu", reps=args.reps, warmup=0, seed=5) as s:
    s.run({c.key: c for c in cfgs}, args.rounds)
    df = pd.DataFrame(s.samples)
df["rel"] = df["latency_ms"] / df.groupby(["key", "round"])["latency_ms"].transform("median")
g = df.groupby("sample")["rel"]
print(f"device {Telemetry('cpu').device_name}, one thread, regime {args.regime}: {len(cfgs) + 1} configs (full "
      f"included), {args.rounds} rounds, {args.reps} timed steps each, no warm-up")
print("each step over its (config, round) median, by step index:")
print(pd.DataFrame({"median": g.median(), "mean": g.mean(), "p90": g.quantile(0.9), "n": g.size()}).round(4))

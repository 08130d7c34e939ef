"""Serving engines side by side: the transformers eager path flextron profiles by default against
llama.cpp running the same sub-networks as GGUF exports (F16 and Q8_0), for decode b1.

Configs: the full model and the lookup's rows of `--run` (three at the demo's budgets). Every
(engine, config) pair is measured once per round in a freshly shuffled order over `--rounds` rounds,
with the transformers full model as each round's reference. Prints the device and, per pair, the
median step (ms) and tokens/s, the CV of its steps, its median ratio to the reference in the same
round, and its speedup over transformers at the same config (median over rounds of the same-round
ratio). With `--llamacpp-run` (a run profiled with `--engine llamacpp`) it also prints that run's
held-out latency-model error beside its noise floor.

    python benchmarks/engines.py --run runs/demo --llamacpp-run runs/demo_llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import platform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a run with a lookup table (its configs are measured)")
    ap.add_argument("--llamacpp-run", default="", help="a run profiled with --engine llamacpp: its fit error")
    ap.add_argument("--ctx", type=int, default=256, help="decode context (the demo's)")
    ap.add_argument("--types", nargs="+", default=["float16", "q8_0"], help="llama.cpp GGUF weight types")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from flextron.devices import set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir, read_json
    from flextron.spec import Regime
    from profiler.bench import RegimeBench
    from profiler.llamacpp import LlamaCppBench, require_binding
    from profiler.rounds import measure_in_rounds, per_round
    from profiler.telemetry import Telemetry
    from profiler.timer import Timer, TimerConfig
    from search.lookup import Lookup

    llama_cpp = require_binding()
    threads = set_cpu_threads("cpu", args.threads)
    run = RunDir(args.run)
    elastic = ElasticModel.load(run.elastic).to(device="cpu", dtype=torch.float32)
    spec = elastic.spec
    configs = {"full": spec.full()}
    for i, row in enumerate(Lookup.load(run.root).rows):
        configs.setdefault(f"lookup{i}@{row.budget_frac:g}x", row.config)
    timer = Timer("cpu", "eager", TimerConfig(warmup=args.warmup, min_reps=args.reps, min_time_s=0.0,
                                              max_reps=args.reps))
    torch_regime = Regime("decode", 1, args.ctx, "float32", "eager")
    engines = {"torch-fp32": RegimeBench(elastic, torch_regime, "cpu")}
    benches = [LlamaCppBench(elastic, Regime("decode", 1, args.ctx, t, "llamacpp"), threads=threads,
                             source_gguf=run.source_gguf()) for t in args.types]
    engines.update({f"llamacpp-{b.gguf_type}": b for b in benches})
    print(json.dumps({"device": Telemetry("cpu").device_name, "machine": platform.machine(),
                      "cpu_count": os.cpu_count(),
                      "threads": threads, "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
                      "model": spec.family, "layers": spec.num_layers, "ctx": args.ctx,
                      "configs": {k: c.to_dict() for k, c in configs.items() if k != "full"},
                      "rounds": args.rounds, "reps": args.reps}), flush=True)
    keys = [f"{e}|{name}" for e in engines for name in configs]
    for b in benches:  # export and load every GGUF before timing anything
        for cfg in configs.values():
            b.forward_fn(cfg)

    def measure(key: str) -> list[float]:
        e, name = key.split("|")
        # a fresh step each time: the transformers bench sets the config (and its KV cache) when built
        return timer.measure(engines[e].forward_fn(configs[name])).samples_ms

    reference = "torch-fp32|full"
    with torch.inference_mode():
        rows = measure_in_rounds(keys, measure, args.rounds, seed=args.seed)
    for b in benches:
        b.close()
    df = pd.DataFrame(rows)
    rt = per_round(df, reference)
    out = []
    for key, g in rt.groupby("key"):
        e, name = key.split("|")
        s = df[df["key"] == key]["latency_ms"].to_numpy()
        base = rt[rt["key"] == f"torch-fp32|{name}"].set_index("round")["median_ms"]
        mine = g.set_index("round")["median_ms"]
        speedup = (base / mine).dropna()
        med = float(np.median(g["median_ms"]))
        out.append({"engine": e, "config": name, "median_ms": round(med, 3), "tokens_per_s": round(1e3 / med, 1),
                    "cv_pct": round(100 * float(s.std() / s.mean()), 2),
                    "p10_p90_ms": [round(float(np.quantile(s, q)), 3) for q in (0.1, 0.9)],
                    "ratio_to_torch_full": round(float(np.median(g["ratio_to_full"])), 4) if key != reference else 1.0,
                    "speedup_vs_torch_same_config": round(float(np.median(speedup)), 2),
                    "speedup_range": [round(float(speedup.min()), 2), round(float(speedup.max()), 2)]})
    for r in sorted(out, key=lambda r: (r["config"], r["engine"])):
        print(json.dumps(r), flush=True)
    if args.llamacpp_run:
        metrics = read_json(RunDir(args.llamacpp_run).require("latency_model", "metrics.json") / "metrics.json")
        for rk, m in metrics.items():
            if isinstance(m, dict) and "heldout" in m:
                print(json.dumps({"llamacpp_latency_model": rk, "heldout": m["heldout"], **{k: m.get(k) for k in (
                    "noise_floor_pct", "ratio_noise_floor_pct", "verdict", "form", "train_configs")}}), flush=True)


if __name__ == "__main__":
    main()

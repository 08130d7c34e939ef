"""Test-retest noise of end-to-end latency: configs measured one after another (blocked, the old
protocol) against interleaved rounds with the full model as the same-round reference.

For each protocol the same configs are measured in two independent passes; the test-retest error
of a config is |a - b| / mean(a, b) between the passes, for its median step (ms) and for its ratio
to the full model measured in the same pass (blocked) or the same rounds (interleaved). The
interleaved protocol also reports its own split-half noise floor (what `flextron profile` and
`flextron verify` report). Prints the device, the threads and every number.

    python benchmarks/measurement_noise.py --run runs/demo --regime decode:b1:ctx256
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--regime", nargs="+", default=["decode:b1:ctx256"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: one)")
    ap.add_argument("--configs", type=int, default=8, help="uniform and random sub-networks besides the full model")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=10, help="blocked protocol: timed steps per config")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from flextron.devices import check_device, set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir
    from flextron.spec import Regime
    from profiler.bench import RegimeBench
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import noise_floor, per_round
    from profiler.telemetry import Telemetry
    from profiler.timer import Timer, TimerConfig

    check_device(args.device)
    threads = set_cpu_threads(args.device, args.threads)
    elastic = ElasticModel.load(RunDir(args.run).elastic)
    spec = elastic.spec
    rng = random.Random(args.seed)
    uniform = spec.uniform_configs()
    subs = rng.sample(uniform[:-1], min(len(uniform) - 1, args.configs // 2))
    subs += [spec.random_config(rng) for _ in range(args.configs - len(subs))]
    configs = {s.key: s for s in subs}
    print(json.dumps({"device": Telemetry(args.device).device_name, "torch": torch.__version__, "threads": threads,
                      "model": spec.family, "layers": spec.num_layers, "configs": len(configs) + 1,
                      "rounds": args.rounds, "reps": args.reps, "blocked_min_reps": args.min_reps}), flush=True)

    def retest(a: dict, b: dict) -> dict:
        keys = sorted(set(a) & set(b))
        err = np.array([abs(a[k] - b[k]) / ((a[k] + b[k]) / 2) for k in keys])
        return {"median_pct": round(100 * float(np.median(err)), 2), "max_pct": round(100 * float(err.max()), 2)}

    for regime_text in args.regime:
        regime = Regime.parse(regime_text, mode="eager" if args.device == "cpu" else "cuda_graph",
                              dtype="float32" if args.device == "cpu" else "bfloat16")
        elastic.to(device=args.device, dtype=getattr(torch, regime.dtype))
        t0 = time.perf_counter()

        # blocked: every config measured to completion, one after another, in a fixed order
        bench = RegimeBench(elastic, regime, args.device)
        timer = Timer(args.device, regime.mode, TimerConfig(warmup=args.warmup, min_reps=args.min_reps, min_time_s=0.0))
        blocked = []
        for _ in range(2):
            med = {k: timer.measure(bench.forward_fn(s)).median_ms for k, s in {FULL: spec.full(), **configs}.items()}
            blocked.append({"ms": med, "ratio": {k: v / med[FULL] for k, v in med.items() if k != FULL}})
        t_blocked = time.perf_counter() - t0

        # interleaved: two independent sessions of rounds
        sessions = []
        for i in range(2):
            s = InterleavedSession(elastic, regime, args.device, args.reps, args.warmup, seed=args.seed + i)
            s.run(configs, args.rounds)
            rt = per_round(s.samples, FULL)
            ms = rt.groupby("key")["median_ms"].median().to_dict()
            ratio = rt[rt["key"] != FULL].groupby("key")["ratio_to_full"].median().to_dict()
            sessions.append({"ms": ms, "ratio": ratio, "floor": noise_floor(s.samples, FULL)})
        full_ms = [b["ms"][FULL] for b in blocked] + [x["ms"][FULL] for x in sessions]
        print(json.dumps({
            "regime": regime.key,
            "full_ms_per_pass": [round(v, 3) for v in full_ms],
            "blocked": {"retest_ms": retest(blocked[0]["ms"], blocked[1]["ms"]),
                        "retest_ratio_to_full": retest(blocked[0]["ratio"], blocked[1]["ratio"]),
                        "seconds": round(t_blocked, 1)},
            "interleaved": {"retest_ms": retest(sessions[0]["ms"], sessions[1]["ms"]),
                            "retest_ratio_to_full": retest(sessions[0]["ratio"], sessions[1]["ratio"]),
                            "split_half_noise_floor_pct": [x["floor"]["noise_floor_pct"] for x in sessions],
                            "split_half_ratio_noise_floor_pct": [x["floor"]["ratio_noise_floor_pct"] for x in sessions],
                            "seconds": round(time.perf_counter() - t0 - t_blocked, 1)},
        }), flush=True)


if __name__ == "__main__":
    main()

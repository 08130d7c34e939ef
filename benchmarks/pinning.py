"""Pinned to one core or not: which gives the steadier interleaved measurement (issue 21's isolation)?

The same configs (the full model, uniform and random sub-networks, some that skip layers) are measured
in interleaved rounds, as `flextron profile` and `flextron verify` measure, once pinned to one core
(`--pin-core`) and once not, alternating which goes first, `--passes` times, on a quiet machine and
beside a bursty interferer (benchmarks/interference.py's: one process per core, `--duty` busy in
`--burst-ms` bursts). Prints per condition and setting the split-half ratio noise floor of each pass
(what the stages report), its median, the median per-step CV and the seconds a pass took.

    PYTHONPATH=. python benchmarks/pinning.py RUN [--passes 3]
"""

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from interference import Interferer

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--regime", default="decode:b1:ctx256")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--core", type=int, default=0, help="the core a pinned pass runs on")
    ap.add_argument("--duty", type=float, default=0.3)
    ap.add_argument("--burst-ms", type=float, default=50.0)
    ap.add_argument("--conditions", nargs="+", default=["quiet", "bursty"], choices=["quiet", "bursty"])
    args = ap.parse_args()

    import pandas as pd

    from flextron.devices import pinned, set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.spec import Regime
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import noise_floor
    from profiler.sweep import depth_configs, random_configs
    from profiler.telemetry import Telemetry

    set_cpu_threads("cpu", 0)
    el = ElasticModel.load(Path(args.run) / "elastic")
    cfgs = el.spec.uniform_configs()[::6] + random_configs(el.spec, 3, 1) + depth_configs(el.spec, 3, 1)
    procs = os.cpu_count() or 2
    print(f"device {Telemetry('cpu').device_name}, {procs} cores, one torch thread, {args.regime}: {len(cfgs) + 1} "
          f"configs (full included), {args.rounds} rounds x {args.reps} steps (warm-up {args.warmup}) per pass; "
          f"pinned = core {args.core}; interferer: {procs} processes, {args.duty:.0%} duty in {args.burst_ms:g} ms "
          "bursts", flush=True)
    rng = random.Random(0)
    results = []
    for cond in args.conditions:
        ctx = Interferer(args.duty, args.burst_ms, procs) if cond == "bursty" else None
        if ctx:
            ctx.__enter__()
        try:
            for p in range(args.passes):
                for pin in rng.sample([-1, args.core], 2):  # which goes first alternates at random
                    t0 = time.perf_counter()
                    with pinned(pin):
                        with InterleavedSession(el, Regime.parse(args.regime), "cpu", args.reps, args.warmup,
                                                seed=100 * p + (pin + 1)) as s:
                            s.run({c.key: c for c in cfgs}, args.rounds)
                            samples = pd.DataFrame(s.samples)
                    floor = noise_floor(samples, FULL)
                    cv = samples.groupby(["key", "round"])["latency_ms"].agg(lambda x: x.std() / x.mean()).median()
                    results.append({"condition": cond, "pinned": pin >= 0, "pass": p, "seconds":
                                    time.perf_counter() - t0, "ratio_floor": floor["ratio_noise_floor_pct"],
                                    "floor": floor["noise_floor_pct"], "step_cv": 100 * cv})
                    r = results[-1]
                    print(f"  {cond} pass {p} {'pinned  ' if r['pinned'] else 'unpinned'}: ratio noise floor "
                          f"{r['ratio_floor']:.2f}%, median-step floor {r['floor']:.2f}%, per-step CV (median over "
                          f"config-rounds) {r['step_cv']:.1f}%, {r['seconds']:.0f} s", flush=True)
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    print("\nsummary (median over passes):")
    for cond in args.conditions:
        for pin in (False, True):
            g = [r for r in results if r["condition"] == cond and r["pinned"] == pin]
            passes = ", ".join(f"{r['ratio_floor']:.2f}" for r in g)
            print(f"  {cond:6s} {'pinned  ' if pin else 'unpinned'}: ratio noise floor "
                  f"{statistics.median(r['ratio_floor'] for r in g):.2f}% (passes: {passes}), per-step CV "
                  f"{statistics.median(r['step_cv'] for r in g):.1f}%, "
                  f"{statistics.median(r['seconds'] for r in g):.0f} s")


if __name__ == "__main__":
    main()

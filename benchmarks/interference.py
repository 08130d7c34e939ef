"""Measurement beside a bursty interferer (issue 21's benchmark).

Runs the default job (`flextron run`) on fresh run directories with and without a synthetic interferer
(one process per core, each busy for `--burst-ms` then idle so that it is busy `--duty` of the time, at
random phases), `--runs` times each, and prints per run: the latency model's held-out Spearman and
MAPE, the profile's and verify's ratio noise floors, the rounds re-measured for a burst and the CPU
steal / other-process shares they saw, verify's verdicts and seconds, a fresh interleaved re-measure
of every lookup row against its budget (with the interferer still running where it ran), and the
wall time of every stage.

    python benchmarks/interference.py --runs 2 --out runs/bench-interference
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path


def burn(duty: float, burst_ms: float, seed: int, stop) -> None:
    """Busy for `burst_ms`, then idle for as long as keeps the duty cycle, at a random phase, until `stop`."""
    rng = random.Random(seed)
    time.sleep(rng.uniform(0, burst_ms / 1e3 / duty))
    while not stop.is_set():
        end = time.perf_counter() + burst_ms / 1e3
        while time.perf_counter() < end:
            pass
        time.sleep(burst_ms / 1e3 * (1 - duty) / duty * rng.uniform(0.5, 1.5))


class Interferer:
    def __init__(self, duty: float, burst_ms: float, procs: int):
        self.stop = mp.Event()
        self.procs = [mp.Process(target=burn, args=(duty, burst_ms, i, self.stop), daemon=True) for i in range(procs)]

    def __enter__(self):
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs:
            p.join(timeout=5)


def remeasure(run: Path, rounds: int, reps: int, precision) -> tuple[list[dict], dict]:
    """Every lookup row's ratio to the full model in fresh interleaved rounds, against its budget: `rounds`
    rounds, then more where a ratio is not pinned down (`precision`: target floor, most rounds, time cap)."""
    import torch

    from flextron.devices import set_cpu_threads
    from flextron.elastic import ElasticModel
    from flextron.spec import Regime, SubnetConfig
    from profiler.interleaved import InterleavedSession

    rows = json.loads((run / "export" / "lookup.json").read_text())["rows"]
    before = torch.get_num_threads()
    set_cpu_threads("cpu", 0)
    el = ElasticModel.load(run / "elastic")
    configs = {SubnetConfig.from_dict(r["config"]).key: SubnetConfig.from_dict(r["config"]) for r in rows}
    with InterleavedSession(el, Regime.parse(rows[0]["regime"]), "cpu", reps=reps, warmup=2, seed=777) as s:
        s.run(configs, rounds)
        refined = s.refine(precision)
        ratios = s.ratios()
    torch.set_num_threads(before)
    return [{"budget_frac": r["budget_frac"], "ratio": ratios[s.key_of(SubnetConfig.from_dict(r["config"]).key)][
        "ratio_to_full"]} for r in rows], refined


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-interference")
    ap.add_argument("--duty", type=float, default=0.3)
    ap.add_argument("--burst-ms", type=float, default=50.0)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="interfering processes (one per core)")
    ap.add_argument("--conditions", nargs="+", default=["quiet", "bursty"], choices=["quiet", "bursty"])
    ap.add_argument("--rounds", type=int, default=6, help="rounds of the fresh re-measure")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target-floor-pct", type=float, default=3.0, help="the re-measure's target ratio noise floor")
    ap.add_argument("--max-rounds", type=int, default=18, help="the re-measure's most rounds per config")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="the re-measure's time cap for added rounds")
    args = ap.parse_args()

    import torch

    from flextron.cli.run import RunConfig, run_pipeline
    from profiler.rounds import Precision, describe_refine
    from profiler.telemetry import Telemetry

    precision = Precision(args.target_floor_pct, args.max_rounds, args.max_seconds)

    print(f"device: {Telemetry('cpu').device_name}  torch {torch.__version__}  cores {os.cpu_count()}  "
          f"interferer: {args.procs} processes, {args.duty:.0%} duty in {args.burst_ms:g} ms bursts", flush=True)
    for cond in args.conditions:
        for i in range(args.runs):
            run = Path(f"{args.out}-{cond}-{i}")
            ctx = Interferer(args.duty, args.burst_ms, args.procs) if cond == "bursty" else None
            t0 = time.perf_counter()
            if ctx:
                ctx.__enter__()
            try:
                summary = run_pipeline(RunConfig(out=str(run), restart=True))
                rows, refined = remeasure(run, args.rounds, args.reps, precision)
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
            total = time.perf_counter() - t0
            metrics = json.loads((run / "latency_model" / "metrics.json").read_text())
            vnoise = json.loads((run / "verify" / "noise.json").read_text())
            pnoise = json.loads((run / "profile" / "noise.json").read_text())
            ver = summary["verify"]
            print(f"\n{cond} run {i} ({run}): {total:.0f} s in all", flush=True)
            for rk, m in metrics.items():
                pi = pnoise.get(rk, {}).get("interference", {})
                vi = vnoise["regimes"].get(rk, {}).get("interference", {})
                print(f"  {rk}: held-out Spearman {m['heldout']['spearman']}, MAPE {m['heldout']['mape_pct']}%; "
                      f"ratio noise floor profile {pnoise.get(rk, {}).get('ratio_noise_floor_pct')}% / verify "
                      f"{vnoise['regimes'].get(rk, {}).get('ratio_noise_floor_pct')}%")
                for stage, d in (("profile", pi), ("verify", vi)):
                    print(f"    {stage}: {d.get('remeasured_rounds')} rounds re-measured for a burst; steal % median "
                          f"{d.get('steal_pct_median')} max {d.get('steal_pct_max')}; other processes % median "
                          f"{d.get('other_pct_median')} max {d.get('other_pct_max')}" + (f" ({d['note']})" if
                                                                                       d.get("note") else ""))
            print(f"  verify: {ver.get('verdicts')}, {summary['stage_seconds'].get('verify')} s, time cap hit: "
                  f"{vnoise.get('time_cap_hit')}")
            print(f"  fresh re-measure: {describe_refine(refined)}")
            for r in rows:
                verdict = "within" if r["ratio"] <= r["budget_frac"] * 1.02 else "OVER"
                print(f"  lookup row {r['budget_frac']:.2f}: fresh re-measure {r['ratio']:.3f} = "
                      f"{r['ratio'] / r['budget_frac']:.3f} x budget ({verdict} x1.02)")
            print("  stage seconds:", json.dumps(summary["stage_seconds"]), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

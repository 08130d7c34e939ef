"""Verify's futility stop, simulated: rounds spent and picks declared within, with and without it.

A simulated pick's per-round ratio to the full model is its true ratio times lognormal noise (median 1,
`--spread` per round); verify's own `_decide` looks at it after 6, 12 and 18 rounds (`--rounds`,
`--max-rounds`) at its spent confidence. For true ratios around the budget, prints the share declared
within and the mean rounds measured, with `--futility 0` (every round) and the default. A pick over its
budget declared within is an error; one under it left undecided costs a replacement. No timing: the
numbers are the same on any machine.

    PYTHONPATH=. python benchmarks/verify_futility.py [--sims 300]
"""

import argparse
from types import SimpleNamespace

import numpy as np


class Sim:
    """The part of an InterleavedSession `_decide` uses, for one pick at `true` times the budget."""

    def __init__(self, true: float, spread: float, seed: int):
        from profiler.interleaved import FULL

        self.samples, self.rounds_of, self.seed, self.full = [], {}, seed, FULL
        self.rng, self.true, self.spread = np.random.default_rng(seed), true, spread

    def key_of(self, key):
        return key

    def run(self, subs, rounds, progress=None):
        first = self.rounds_of.get(self.full, 0)
        for r in range(first, first + rounds):
            self.samples += [{"key": self.full, "round": r, "latency_ms": 100.0},
                             {"key": "pick", "round": r,
                              "latency_ms": 100 * self.true * float(self.rng.lognormal(0, self.spread))}]
        for k in (self.full, "pick"):
            self.rounds_of[k] = self.rounds_of.get(k, 0) + rounds

    def stats(self, key, quantile, limit, confidence):
        from profiler.rounds import compliance, tail_ratio

        st = compliance(*tail_ratio(self.samples, key, self.full, quantile, confidence=confidence), limit, confidence)
        return {**st, "rounds": self.rounds_of[key]}


def main():
    import search.verify as v

    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-rounds", type=int, default=18)
    ap.add_argument("--spread", type=float, nargs="+", default=[0.03, 0.06])
    args = ap.parse_args()
    default = v.VerifyConfig(run="unused").futility
    print(f"simulated picks: lognormal per-round ratio noise, {args.sims} per cell; verify looks after "
          f"{args.rounds}..{args.max_rounds} rounds; futility {default} (default) against 0")
    for spread in args.spread:
        print(f"\nper-round spread {spread:.0%}:")
        print("  true ratio / budget | within (futility 0) | within (default) | rounds (0) | rounds (default)")
        for true in (0.90, 0.94, 0.96, 0.98, 1.00, 1.02):
            out = {}
            for fut in (0.0, default):
                cfg = v.VerifyConfig(run="unused", rounds=args.rounds, max_rounds=args.max_rounds, futility=fut)
                within, rounds = 0, 0
                for seed in range(args.sims):
                    s = Sim(true, spread, seed)
                    s.run({}, cfg.rounds)
                    st = v._decide(s, SimpleNamespace(key="pick"), 1.0, cfg, "p50")
                    within += st["verdict"] == "within"
                    rounds += st["rounds"]
                out[fut] = (within / args.sims, rounds / args.sims)
            print(f"  {true:19.2f} | {out[0.0][0]:19.3f} | {out[default][0]:16.3f} | {out[0.0][1]:10.1f} | "
                  f"{out[default][1]:16.1f}", flush=True)


if __name__ == "__main__":
    main()

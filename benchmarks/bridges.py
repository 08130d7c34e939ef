"""What the linear bridges of skipped layers buy (flextron/bridges.py), on a run converted with them.

For k layers skipped along the run's depth path (its quality table), prints validation perplexity with
the bridges and without (the identity, as a run converted with --no-bridges), and the decode step's
ratio to the full model for both, every config interleaved in each of `--rounds` rounds (batch 1,
context 255, the run's threads; ratio: median over rounds of the config's median step over the full
model's in the same round).

    PYTHONPATH=. python benchmarks/bridges.py --run runs/demo [--windows 64] [--rounds 10]
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from flextron.data import token_windows
from flextron.elastic import ElasticModel
from profiler.telemetry import Telemetry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 6, 9, 12, 15])
    ap.add_argument("--windows", type=int, default=64, help="validation windows of 256 tokens")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    em = ElasticModel.load(f"{args.run}/elastic")
    if em.bridges is None:
        raise SystemExit(f"{args.run} was converted without bridges; convert a run with them (the default)")
    tables = sorted(Path(args.run, "quality").glob("*/quality_table.json"))
    if not tables:
        raise SystemExit(f"{args.run} has no quality table; run `flextron quality --run {args.run}` first")
    path = json.loads(tables[0].read_text())["path"]
    bridges = em.bridges
    spec = em.spec
    val = token_windows(em.tokenizer, em.adapter, "validation", 256, args.windows)
    configs = {"full": (spec.full(), True)}
    for k in args.ks:
        configs[f"skip {k} bridged"] = (spec.depth(path[:k]), True)
        configs[f"skip {k} identity"] = (spec.depth(path[:k]), False)

    def use(cfg, bridged):
        em.bridges = bridges if bridged else None
        em.set_config(cfg)

    @torch.no_grad()
    def ppl(cfg, bridged):
        use(cfg, bridged)
        tot, n = 0.0, 0
        for ids in val.split(8):
            lg = em(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tot += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += ids[:, 1:].numel()
        return math.exp(tot / n)

    t0 = time.time()
    quality = {name: ppl(*c) for name, c in configs.items()}
    print(f"perplexity on {val[:, 1:].numel()} validation tokens in {time.time() - t0:.0f} s", flush=True)

    from transformers import DynamicCache

    prompt, nxt = val[:1, :255], val[:1, 255:256]
    ratios = {name: [] for name in configs}
    with torch.no_grad():
        for _ in range(args.rounds):
            med = {}
            for name, c in configs.items():
                use(*c)
                cache = DynamicCache(config=em.model.config)
                em(input_ids=prompt, cache=cache, use_cache=True)
                times = []
                for s in range(args.steps + 1):
                    t = time.perf_counter()
                    em(input_ids=nxt, cache=cache, use_cache=True)
                    if s:  # the first step is a warm-up
                        times.append(time.perf_counter() - t)
                    cache.crop(-1)
                med[name] = statistics.median(times)
            for name in configs:
                ratios[name].append(med[name] / med["full"])
    print(f"\ndevice: {Telemetry('cpu').device_name}  torch {torch.__version__}  threads 2; depth path {path}")
    print(f"bridges used by layer: {[int(bool(b.any())) for b in bridges]}")
    print(f"{args.rounds} interleaved rounds x {args.steps} decode steps (b1, ctx 255)")
    print(f"{'config':22s} {'ppl':>8s} {'ratio':>7s} {'round spread (p10-p90)':>24s}")
    for name in configs:
        r = sorted(ratios[name])
        lo, hi = r[int(0.1 * (len(r) - 1))], r[int(math.ceil(0.9 * (len(r) - 1)))]
        print(f"{name:22s} {quality[name]:8.2f} {statistics.median(r):7.3f} {lo:11.3f}-{hi:.3f}")


if __name__ == "__main__":
    main()

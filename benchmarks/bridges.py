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
import sys
import time
from pathlib import Path

import torch

from flextron.data import token_windows
from flextron.elastic import ElasticModel
from profiler.telemetry import Telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_rounds import print_table, step_ratios  # noqa: E402


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
    configs = {"full": {"cfg": spec.full(), "bridged": True}}
    for k in args.ks:
        configs[f"skip {k} bridged"] = {"cfg": spec.depth(path[:k]), "bridged": True}
        configs[f"skip {k} identity"] = {"cfg": spec.depth(path[:k]), "bridged": False}

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
    quality = {name: ppl(**c) for name, c in configs.items()}
    print(f"perplexity on {val[:, 1:].numel()} validation tokens in {time.time() - t0:.0f} s", flush=True)

    prompt, nxt = val[:1, :255], val[:1, 255:256]
    ratios = step_ratios(em.model, prompt, nxt, configs, use, args.rounds, args.steps)
    print(f"\ndevice: {Telemetry('cpu').device_name}  torch {torch.__version__}  threads 2; depth path {path}")
    print(f"bridges used by layer: {[int(bool(b.any())) for b in bridges]}")
    print(f"{args.rounds} interleaved rounds x {args.steps} decode steps (b1, ctx 255)")
    print_table(quality, ratios, width=22)

if __name__ == "__main__":
    main()

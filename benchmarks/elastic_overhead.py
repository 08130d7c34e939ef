"""Forward time of the elastic model at full width against the original transformers model,
measured side by side (interleaved) with the project's timer. Prints the ratio and the device.

    python benchmarks/elastic_overhead.py [--device cpu|cuda] [--seq 256] [--batch 1]
    python benchmarks/elastic_overhead.py --shape smollm2 --device cuda --mode cuda_graph

`--shape` uses random weights in a real architecture (see latency_model.py), for machines without
the model packages.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from flextron.elastic import ElasticModel, spec_from_model
from flextron.models import load_source
from profiler.telemetry import Telemetry
from profiler.timer import Timer, TimerConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default=None, help="random weights in this shape instead of --model")
    ap.add_argument("--mode", default="eager", choices=["eager", "cuda_graph"])
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.shape:
        sys.path.insert(0, str(Path(__file__).parent))
        from latency_model import shaped_llama

        from flextron.models import byte_tokenizer

        original, tok, args.model = (
            shaped_llama(args.shape, "cpu", torch.float32),
            byte_tokenizer(),
            f"{args.shape}-shaped",
        )
    else:
        original, tok = load_source(args.model)
    original = original.to(args.device, dtype).eval()
    elastic = ElasticModel(copy.deepcopy(original), tok, spec_from_model(original, 64, 8, 4))
    ids = torch.randint(0, elastic.spec.vocab_size, (args.batch, args.seq), device=args.device)
    timer = Timer(args.device, args.mode, TimerConfig(min_reps=10, min_time_s=0.5))
    orig_ms, el_ms = [], []
    for _ in range(args.rounds):  # interleaved so drift hits both equally
        orig_ms.append(timer.measure(lambda: original(input_ids=ids, use_cache=False)).median_ms)
        el_ms.append(timer.measure(lambda: elastic(input_ids=ids, use_cache=False)).median_ms)
    o, e = sorted(orig_ms)[len(orig_ms) // 2], sorted(el_ms)[len(el_ms) // 2]
    print(
        f"device: {Telemetry(args.device).device_name}  torch {torch.__version__}  {args.model} "
        f"b{args.batch} s{args.seq} {args.mode}"
    )
    print(f"original {o:.2f} ms   elastic(full) {e:.2f} ms   ratio {e / o:.3f}")
    print(json.dumps({"original_ms": round(o, 3), "elastic_ms": round(e, 3), "ratio": round(e / o, 4)}))


if __name__ == "__main__":
    main()

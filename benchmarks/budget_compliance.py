"""Budget compliance: run the whole job (convert, profile, fit, search, verify, report, export), then
measure every config of the exported lookup again, in fresh rounds, and print measured / budget
(the target: every one <= 1.02), with the device.

    python benchmarks/budget_compliance.py --device cuda --shape smollm2 --regime prefill:b8:s1024
    python benchmarks/budget_compliance.py --device cpu --model smollm2-135m --regime decode:b1:ctx256

`--shape smollm2` writes a SmolLM2-shaped checkpoint with random weights (latency needs shapes, not
trained values; its perplexities are meaningless), so a GPU machine without the model package can run it.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from flextron.elastic import ElasticModel
from flextron.pipeline import RunConfig, run_pipeline
from flextron.spec import Regime, SubnetConfig
from profiler.sweep import RegimeBench
from profiler.telemetry import Telemetry
from profiler.timer import Timer, TimerConfig


def write_random(shape: str, out: Path) -> str:
    """A checkpoint folder (model + byte tokenizer) of this shape with random weights."""
    from latency_model import shaped_llama

    from flextron.models import byte_tokenizer

    if not (out / "config.json").is_file():
        tok = byte_tokenizer()
        torch.manual_seed(0)
        model = shaped_llama(shape, "cpu", torch.float32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def main():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from latency_model import SHAPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regime", default="decode:b1:ctx256")
    ap.add_argument("--budget-frac", type=float, action="append", default=None)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-compliance")
    args = ap.parse_args()
    out = Path(args.out)
    model = write_random(args.shape, out.with_name(out.name + "-model")) if args.shape else args.model
    summary = run_pipeline(RunConfig(model=model, out=str(out), device=args.device, regime=(args.regime,),
                                     budget_frac=tuple(args.budget_frac or (0.5, 0.6, 0.7, 0.8, 0.9)),
                                     trials=args.trials))
    rows = json.loads((out / "export" / "lookup.json").read_text())["rows"]
    el = ElasticModel.load(out / "elastic")
    regime = Regime.parse(rows[0]["regime"])
    el.to(device=args.device, dtype=getattr(torch, regime.dtype))
    bench = RegimeBench(el, regime, args.device)
    timer = Timer(args.device, regime.mode, TimerConfig(min_reps=20, min_time_s=0.1))
    measured = {i: [] for i in range(len(rows))}
    for _ in range(args.rounds):  # fresh rounds over all configs, so drift hits every config alike
        for i, r in enumerate(rows):
            measured[i].append(timer.measure(bench.forward_fn(SubnetConfig.from_dict(r["config"]))).median_ms)
    print(f"device: {Telemetry(args.device).device_name}  torch {torch.__version__}  model {model}  regime {regime.key}")
    print(f"{'budget ms':>10s} {'verify ms':>10s} {'re-measured ms':>15s} {'ratio':>7s} {'source':>8s}")
    ratios = []
    for i, r in enumerate(rows):
        m = float(np.median(measured[i]))
        ratios.append(m / r["budget_ms"])
        print(f"{r['budget_ms']:10.3f} {r['measured_latency_ms']:10.3f} {m:15.3f} {ratios[-1]:7.3f} {r['source']:>8s}")
    print(json.dumps({"device": summary["device"], "regime": regime.key, "configs": len(rows),
                      "max_ratio": round(max(ratios), 4), "within_1.02": sum(x <= 1.02 for x in ratios),
                      "run_seconds": summary["seconds"], "sources": summary["lookup_sources"]}))


if __name__ == "__main__":
    main()

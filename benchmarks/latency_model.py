"""Profile a model, fit the latency model, and print held-out accuracy against the naive per-layer
sum, the sweep's drift, and latency against MLP width (width physics), with the device.

    python benchmarks/latency_model.py --model smollm2-135m --device cpu
    python benchmarks/latency_model.py --shape llama7b --device cuda --regime decode:b1:ctx1024 --regime prefill:b1:s1024
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from flextron.elastic import ElasticModel, spec_from_model
from profiler.latency_model import FitConfig, fit
from profiler.sweep import ProfileConfig, profile, run_sweep


def llama7b_shaped(device: str, dtype: torch.dtype) -> ElasticModel:
    """LLaMA-7B-shaped layers with random weights: latency needs shapes, not trained values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flextron.models import byte_tokenizer

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    spec = spec_from_model(model, alignment=64, mlp_choices=8, head_choices=4)
    return ElasticModel(model, byte_tokenizer(), spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=["llama7b"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regime", action="append", default=None)
    ap.add_argument("--e2e-random", type=int, default=24)
    ap.add_argument("--out", default="runs/bench-latency")
    args = ap.parse_args()
    regimes = tuple(args.regime or ["decode:b1:ctx256", "prefill:b1:s128"])
    out = Path(args.out)
    t0 = time.perf_counter()
    pcfg = ProfileConfig(run=str(out), device=args.device, regime=regimes, e2e_random=args.e2e_random)
    if args.shape:
        dtype = getattr(torch, pcfg.regimes()[0].dtype)
        el = llama7b_shaped(args.device, dtype)
        (out / "elastic").mkdir(parents=True, exist_ok=True)
        el.spec.save(out / "elastic" / "elastic_spec.json")
        sweep = run_sweep(el, out / "profile", pcfg)
    else:
        from flextron.convert import ConvertConfig, convert

        convert(ConvertConfig(model=args.model, out=str(out)))
        sweep = profile(pcfg)
    t_sweep = time.perf_counter() - t0
    summary = fit(FitConfig(run=str(out)))
    metrics = json.loads((out / "latency_model" / "metrics.json").read_text())
    layers = pd.read_parquet(out / "profile" / "layers.parquet")
    e2e = pd.read_parquet(out / "profile" / "e2e.parquet")
    print(f"device: {summary['device']}  torch {torch.__version__}  sweep {t_sweep:.1f} s  anchor CV {sweep['anchor_cv']}")
    print(f"{'regime':42s} {'heldout MAPE%':>13s} {'max%':>6s} {'rho':>6s} {'naive MAPE%':>11s} {'n':>3s}")
    for k, m in metrics.items():
        h, nv = m["heldout"], m["naive_sum_heldout"]
        print(f"{k:42s} {h['mape_pct']:13.2f} {h['max_ape_pct']:6.2f} {h['spearman']:6.3f} {nv['mape_pct']:11.2f} {h['n']:3d}")
    print("\nwidth physics: median MLP-block ms by width (layer 0), and full/smallest end-to-end ms")
    for k in metrics:
        d = layers[(layers.regime == k) & (layers.kind == "mlp") & (layers.layer == 0) & ~layers.anchor]
        row = ", ".join(f"{int(w)}:{ms:.3f}" for w, ms in sorted(zip(d.width, d.latency_ms_median)))
        e = e2e[(e2e.regime == k) & e2e.uniform].sort_values("params")
        print(f"  {k}: {row}")
        print(f"    e2e smallest {e.latency_ms_median.iloc[0]:.3f} ms, full {e.latency_ms_median.iloc[-1]:.3f} ms "
              f"(ratio {e.latency_ms_median.iloc[0] / e.latency_ms_median.iloc[-1]:.2f}); "
              f"full achieved {e.achieved_gbps.iloc[-1]:.1f} GB/s, {e.achieved_tflops.iloc[-1]:.3f} TFLOP/s")
    print(json.dumps({"device": summary["device"], "sweep_s": round(t_sweep, 1), **{k: v for k, v in summary.items() if ":" in k}}))


if __name__ == "__main__":
    main()

"""Profile a model, fit the latency model, and print held-out accuracy against the naive per-layer
sum, the layer sweep's time and drift, how well a repeated sweep reproduces cell medians, what the
execution mode does to width, and latency against MLP width including unaligned widths, with the device.

    python benchmarks/latency_model.py --model smollm2-135m --device cpu
    python benchmarks/latency_model.py --shape llama7b --device cuda --regime decode:b1:ctx1024 prefill:b1:s1024
    python benchmarks/latency_model.py --shape smollm2 --device cuda --regime decode:b1:ctx1024:bfloat16:eager

`--shape` builds random weights in a real architecture (latency needs shapes, not trained values),
so nothing is downloaded; `--model` converts a real model first.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flextron.elastic import ElasticModel, spec_from_model
from flextron.spec import Regime
from profiler.fit import FitConfig, fit
from profiler.profile import LAYERS_FILE, Profile, profile_dir
from profiler.sweep import ProfileConfig, run_sweep
from profiler.timer import Timer, TimerConfig

SHAPES = {
    "llama7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def shaped_llama(shape: str, device: str, dtype: torch.dtype, **config_extra):
    """A plain transformers Llama of this shape with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape], **config_extra)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def shaped_model(shape: str, device: str, dtype: torch.dtype) -> ElasticModel:
    from flextron.models import byte_tokenizer

    model = shaped_llama(shape, device, dtype)
    spec = spec_from_model(model, alignment=64, mlp_choices=8, head_choices=4)
    return ElasticModel(model, byte_tokenizer(), spec)


def repeat_cv(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Per-cell CV of the two sweeps' medians (population std of the pair over its mean)."""
    cols = ["regime", "layer", "kind", "width", "latency_ms_median"]
    m = a[~a.anchor][cols].merge(b[~b.anchor][cols], on=cols[:4], suffixes=("_a", "_b"))
    pair = m[["latency_ms_median_a", "latency_ms_median_b"]].to_numpy()
    cv = np.abs(pair[:, 0] - pair[:, 1]) / pair.sum(axis=1)
    out = {}
    for rk, idx in m.groupby("regime").indices.items():
        c = cv[idx] * 100
        out[rk] = {
            "cells": len(c),
            "median_cv_pct": round(float(np.median(c)), 2),
            "p90_cv_pct": round(float(np.percentile(c, 90)), 2),
            "max_cv_pct": round(float(c.max()), 2),
            "share_within_2pct": round(float((c <= 2).mean()), 3),
        }
    return out


def width_physics(el: ElasticModel, regime: Regime, device: str, tcfg: TimerConfig) -> list[tuple[int, float]]:
    """Layer-0 MLP (gate/up/down sliced to a prefix) at aligned widths and at one below each."""
    torch.manual_seed(0)
    dtype = getattr(torch, regime.dtype)
    layer = el.adapter.layers(el.model)[0]
    mlp = el.adapter.mlp_of(layer)
    gate, up, down = (m.weight.detach() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(regime.batch * regime.new_tokens, gate.shape[1], device=device, dtype=dtype)
    timer = Timer(device, regime.mode, tcfg)
    out = []
    for w in el.spec.mlp_widths[0]:
        for width in (w, w - 1):
            # Contiguous copies: a prefix view of an unaligned width would also be unaligned in stride.
            g, u, d = gate[:width].contiguous(), up[:width].contiguous(), down[:, :width].contiguous()
            ms = timer.measure(
                lambda: torch.nn.functional.linear(
                    torch.nn.functional.silu(torch.nn.functional.linear(x, g)) * torch.nn.functional.linear(x, u), d
                )
            ).median_ms
            out.append((width, ms))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regime", nargs="+", default=None)
    ap.add_argument("--e2e-random", type=int, default=24)
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--min-time-ms", type=float, default=30.0)
    ap.add_argument("--energy-s", type=float, default=0.5)
    ap.add_argument("--repeat", action="store_true", help="sweep the layers twice and report per-cell CV")
    ap.add_argument("--sweep-only", action="store_true", help="time the layer sweep alone, then stop")
    ap.add_argument("--out", default="runs/bench-latency")
    args = ap.parse_args()
    regimes = tuple(args.regime or ["decode:b1:ctx256", "prefill:b1:s128"])
    out = Path(args.out)
    pcfg = ProfileConfig(
        run=str(out),
        device=args.device,
        regime=regimes,
        e2e_random=args.e2e_random,
        min_reps=args.min_reps,
        min_time_ms=args.min_time_ms,
        energy_s=args.energy_s,
    )
    if args.shape:
        el = shaped_model(args.shape, args.device, getattr(torch, pcfg.regimes()[0].dtype))
        (out / "elastic").mkdir(parents=True, exist_ok=True)
        el.spec.save(out / "elastic" / "elastic_spec.json")
        name = f"{args.shape}-shaped (random weights)"
    else:
        from flextron.convert import ConvertConfig, convert

        convert(ConvertConfig(model=args.model, out=str(out)))
        el = ElasticModel.load(out / "elastic")
        name = args.model
    el.to(device=args.device)
    t0 = time.perf_counter()
    sweep = run_sweep(el, profile_dir(out), replace(pcfg, layers_only=True))
    t_layers = time.perf_counter() - t0
    if args.sweep_only:
        print(
            f"device: {sweep['device']}  torch {torch.__version__}  model {name}  layer sweep {t_layers:.1f} s for "
            f"{sweep['layer_cells']} cells ({len(regimes)} regimes, min {args.min_time_ms} ms per cell); "
            f"anchor CV {sweep['anchor_cv']}"
        )
        return
    repeat = None
    if args.repeat:
        run_sweep(el, out / "profile-repeat", replace(pcfg, layers_only=True, seed=1))
        repeat = repeat_cv(
            pd.read_parquet(profile_dir(out) / LAYERS_FILE), pd.read_parquet(out / "profile-repeat" / LAYERS_FILE)
        )
    t1 = time.perf_counter()
    run_sweep(el, profile_dir(out), pcfg)  # resumes: the layer cells are done, so this measures end to end
    t_e2e = time.perf_counter() - t1
    summary = fit(FitConfig(run=str(out)))
    metrics = json.loads((out / "latency_model" / "metrics.json").read_text())
    profile = Profile.load(out)
    spec = el.spec
    print(
        f"device: {summary['device']}  torch {torch.__version__}  model {name}  "
        f"MLP widths {spec.mlp_widths[0]}  heads {spec.head_counts[0]}"
    )
    print(
        f"layer sweep {t_layers:.1f} s for {sweep['layer_cells']} cells ({len(regimes)} regimes); "
        f"end-to-end {t_e2e:.1f} s; anchor CV {sweep['anchor_cv']}; throttled cells {sweep['throttled_cells']}"
    )
    if repeat:
        print("repeated sweep, per-cell CV of medians:", json.dumps(repeat))
    print(
        f"\n{'regime':44s} {'heldout MAPE%':>13s} {'max%':>6s} {'rho':>6s} {'naive MAPE%':>11s} "
        f"{'naive max%':>10s} {'n':>3s}"
    )
    for k, m in metrics.items():
        h, nv = m["heldout"], m["naive_sum_heldout"]
        print(
            f"{k:44s} {h['mape_pct']:13.2f} {h['max_ape_pct']:6.2f} {h['spearman']:6.3f} {nv['mape_pct']:11.2f} "
            f"{nv['max_ape_pct']:10.2f} {h['n']:3d}"
        )
    print("\nexecution mode: end-to-end median ms of uniform configs (MLP fraction / heads)")
    wmax, hmax = spec.mlp_widths[0][-1], spec.head_counts[0][-1]
    for k in metrics:
        e = profile.uniform(k)
        e["w"] = e.config.map(lambda c: json.loads(c)["mlp_width"][0])
        e["h"] = e.config.map(lambda c: json.loads(c)["heads"][0])
        full = e[(e.w == wmax) & (e.h == hmax)].latency_ms_median.iloc[0]
        cells = []
        for w, h in [
            (wmax, hmax),
            (wmax, spec.head_counts[0][0]),
            (spec.mlp_widths[0][len(spec.mlp_widths[0]) // 2 - 1], hmax),
            (spec.mlp_widths[0][len(spec.mlp_widths[0]) // 2 - 1], spec.head_counts[0][0]),
            (spec.mlp_widths[0][0], spec.head_counts[0][0]),
        ]:
            ms = e[(e.w == w) & (e.h == h)].latency_ms_median.iloc[0]
            cells.append(f"{w / wmax:.2f}/{h}: {ms:.3f} ({ms / full:.2f}x)")
        energy = e[(e.w == wmax) & (e.h == hmax)].get("energy_mj_per_token")
        en = f"  energy full {energy.iloc[0]:.2f} mJ/token" if energy is not None and pd.notna(energy.iloc[0]) else ""
        print(f"  {k}: " + ", ".join(cells) + en)
    print("\nwidth physics: layer-0 MLP median ms, aligned width and one below it (unaligned)")
    tcfg = TimerConfig(min_reps=args.min_reps, min_time_s=args.min_time_ms / 1e3)
    for r in pcfg.regimes():
        el.to(dtype=getattr(torch, r.dtype))
        pts = width_physics(el, r, args.device, tcfg)
        row = ", ".join(f"{w}:{ms:.4f}" for w, ms in pts)
        worst = max(pts[i + 1][1] / pts[i][1] for i in range(0, len(pts), 2))
        print(f"  {r.key}: {row}\n    worst unaligned/aligned ratio {worst:.2f}x")
    print(
        json.dumps(
            {
                "device": summary["device"],
                "model": name,
                "layer_sweep_s": round(t_layers, 1),
                "repeat": repeat,
                **{k: v for k, v in summary.items() if ":" in k},
            }
        )
    )


if __name__ == "__main__":
    main()

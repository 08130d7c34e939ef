"""What evaluating quality in bfloat16 instead of float32 costs and buys (`--eval-dtype`).

On a finished run (converted, `flextron quality` done on the one-shot weights), without writing into it:
1. times `mean_loss` of the run's quality-stage configs (its evaluations.parquet; first `--configs`) on
   the search's setting (8 x 128 validation tokens), float32 and bfloat16 alternating config by config
   (the same process, nothing else running), and prints each config's loss in both and the perplexity
   difference, and the speed ratio (median and p10-p90 over configs);
2. measures the per-layer quality table in both precisions on the calibration windows (2 x 128) and
   prints how the deltas agree (Pearson, Spearman, mean absolute difference, overall and for the small
   deltas), and the quality model's held-out Spearman when refitted on each table with the run's own
   (float32) evaluations, fitted and held-out configs as the run split them.

    PYTHONPATH=. python benchmarks/eval_dtype.py runs/<run> [--configs 14]
"""

import argparse
import json
import math
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from flextron.data import token_windows
from flextron.devices import cpu_flags
from flextron.elastic import ElasticModel
from flextron.evaluate import mean_loss
from flextron.quality_model import QualityModel, measure_table
from flextron.rundir import RunDir
from flextron.spec import SubnetConfig
from profiler.telemetry import Telemetry


def deltas(table) -> np.ndarray:
    return np.array([*table.skip, *(v for m in table.mlp for v in m[:-1]), *(v for h in table.heads for v in h[:-1])])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--configs", type=int, default=14, help="quality-stage configs timed and compared")
    args = ap.parse_args()
    run = RunDir(args.run)
    wdir = run.weights("elastic")[1]
    corpus = run.corpus("")
    models = {dt: ElasticModel.load(wdir, dtype=dt) for dt in ("float32", "bfloat16")}
    spec = models["float32"].spec
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})
    print(f"device: {Telemetry('cpu').device_name}  flags {flags}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  run {run.root}", flush=True)
    ev = pd.read_parquet(run.root / "quality" / "elastic" / "evaluations.parquet")
    cfgs = [spec.full()] + [SubnetConfig.from_json(c) for c in ev["config"][: args.configs]]
    windows = token_windows(models["float32"].tokenizer, models["float32"].adapter, "validation", 128, 8, corpus)
    for m in models.values():  # one warm-up forward each
        mean_loss(m, spec.full(), windows[:1], 8)
    loss = {dt: [] for dt in models}
    secs = {dt: [] for dt in models}
    for i, c in enumerate(cfgs):
        for dt in (("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")):  # alternate who goes first
            t = time.perf_counter()
            loss[dt].append(mean_loss(models[dt], c, windows, 8))
            secs[dt].append(time.perf_counter() - t)
    a, b = np.array(loss["float32"]), np.array(loss["bfloat16"])
    speed = np.array(secs["float32"]) / np.array(secs["bfloat16"])
    print(f"\n1. {len(cfgs)} configs (full model first), {windows[:, 1:].numel()} validation tokens each")
    print(f"{'skipped':>7s} {'fp32 loss':>9s} {'bf16 loss':>9s} {'ppl diff %':>10s} {'fp32 s':>6s} {'bf16 s':>6s}")
    for c, x, y, s32, s16 in zip(cfgs, a, b, secs["float32"], secs["bfloat16"]):
        print(f"{len(c.skip):7d} {x:9.4f} {y:9.4f} {100 * (math.exp(y - x) - 1):+10.2f} {s32:6.2f} {s16:6.2f}")
    print(f"speed float32/bfloat16: median {np.median(speed):.2f}x (p10-p90 {np.quantile(speed, 0.1):.2f}-"
          f"{np.quantile(speed, 0.9):.2f}); |ppl diff| median {100 * np.median(np.abs(np.expm1(b - a))):.2f}%, "
          f"max {100 * np.max(np.abs(np.expm1(b - a))):.2f}%; Spearman of the losses {spearmanr(a, b).statistic:.4f}",
          flush=True)

    calib = token_windows(models["float32"].tokenizer, models["float32"].adapter, "calibration", 128, 2, corpus)
    tables = {}
    for dt, m in models.items():
        t = time.perf_counter()
        tables[dt] = measure_table(m, calib)
        print(f"\n2. quality table in {dt}: {time.perf_counter() - t:.1f} s, base loss {tables[dt].base_loss:.4f}",
              flush=True)
    x, y = deltas(tables["float32"]), deltas(tables["bfloat16"])
    small = np.abs(x) < 0.02
    print(f"deltas ({len(x)}): Pearson {pearsonr(x, y).statistic:.5f}, Spearman {spearmanr(x, y).statistic:.4f}, "
          f"mean |diff| {np.mean(np.abs(x - y)):.4f} nats (mean |delta| {np.mean(np.abs(x)):.4f}); the {small.sum()} "
          f"under 0.02 nats: Spearman {spearmanr(x[small], y[small]).statistic:.4f}, "
          f"mean |diff| {np.mean(np.abs(x - y)[small]):.4f}")
    held = ev["heldout"].to_numpy()
    all_cfgs = [SubnetConfig.from_json(c) for c in ev["config"]]
    losses = ev["loss"].to_numpy()
    for dt, table in tables.items():
        qm = QualityModel(table, spec).fit([c for c, h in zip(all_cfgs, held) if not h], losses[~held])
        p = qm.predict(all_cfgs)
        print(f"quality model on the {dt} table: form {qm.form_}, held-out Spearman "
              f"{spearmanr(losses[held], p[held]).statistic:.4f} on {held.sum()} configs, mean abs error "
              f"{np.mean(np.abs(p[held] - losses[held])):.3f} nats")
    print(json.dumps({"speed_median": round(float(np.median(speed)), 3)}))


if __name__ == "__main__":
    main()

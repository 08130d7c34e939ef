"""`flextron report`: one self-contained HTML page, PNG plots and a Markdown summary of a run.

Reads artifacts from disk only (Parquet/JSON); imports no torch.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError


@dataclass(frozen=True)
class ReportConfig:
    run: str = "runs/demo"


def _save(fig, path: Path, pngs: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    pngs.append(path)


def _plots(run: Path, out: Path) -> tuple[list[Path], dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from search.quality import QUALITY_CACHE, read_quality_cache, search_quality_setting, with_weights

    pngs, numbers = [], {}
    layers = pd.read_parquet(run / "profile" / "layers.parquet")
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    device = layers["device_name"].iloc[0]
    setting = search_quality_setting(run)
    losses = read_quality_cache(run / "search" / QUALITY_CACHE, setting)
    trained = bool(setting) and with_weights(setting, "trained") == setting
    one_shot = read_quality_cache(run / "search" / QUALITY_CACHE, with_weights(setting, "elastic")) if trained else {}
    verified_path = run / "verify" / "verified.parquet"
    verified = pd.read_parquet(verified_path) if verified_path.is_file() else pd.DataFrame()

    # 1. Pareto frontier: perplexity against measured latency.
    for regime, g in e2e.groupby("regime"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        uni = g[g["uniform"] & g["config_key"].isin(losses)]
        if len(uni):
            ax.scatter(uni["latency_ms_median"], [math.exp(losses[k]) for k in uni["config_key"]],
                       label="uniform-width slicing (" + ("trained elastic model)" if trained else "one-shot, untrained)"),
                       marker="s", alpha=0.7)
        base = g[g["uniform"] & g["config_key"].isin(one_shot)]
        if len(base):
            ax.scatter(base["latency_ms_median"], [math.exp(one_shot[k]) for k in base["config_key"]],
                       label="uniform-width slicing (one-shot, untrained)", marker="x", c="0.5", alpha=0.8)
        full = g[g["config_key"] == g.sort_values("params")["config_key"].iloc[-1]]
        if len(full) and full["config_key"].iloc[0] in losses:
            ax.scatter(full["latency_ms_median"], [math.exp(losses[full["config_key"].iloc[0]])],
                       marker="*", s=200, c="k", label="full model")
        v = verified[verified["regime"] == regime] if len(verified) else verified
        if len(v):
            by_router = v["source"] == "router"
            if (~by_router).any():
                ax.scatter(v.loc[~by_router, "measured_latency_ms"], v.loc[~by_router, "ppl"], marker="o", c="C3",
                           label="search (verified)")
            if by_router.any():
                ax.scatter(v.loc[by_router, "measured_latency_ms"], v.loc[by_router, "ppl"], marker="D", c="C2",
                           label="router-chosen (verified)")
            for r in v.itertuples():
                ax.axvline(r.budget_ms, c="C3", alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel(f"measured latency (ms), {regime}")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"Pareto frontier on {device}")
        ax.legend(fontsize=8)
        p = out / f"pareto_{regime.replace(':', '_')}.png"
        _save(fig, p, pngs)

    # 2. layer x width heatmaps per regime.
    for regime, g in layers[~layers["anchor"] & (layers["status"] == "ok")].groupby("regime"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, kind in zip(axes, ("mlp", "attn")):
            piv = g[g["kind"] == kind].pivot_table(index="layer", columns="width", values="latency_ms_median")
            im = ax.imshow(piv.values, aspect="auto", cmap="viridis", origin="lower")
            ax.set_xticks(range(len(piv.columns)), [str(c) for c in piv.columns], rotation=60, fontsize=7)
            ax.set_xlabel("MLP width" if kind == "mlp" else "attention heads")
            ax.set_ylabel("layer")
            ax.set_title(f"{kind} ms")
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{regime} on {device}", fontsize=9)
        p = out / f"heatmap_{regime.replace(':', '_')}.png"
        _save(fig, p, pngs)

    # 3. predicted vs measured with held-out error.
    preds_path = run / "latency_model" / "predictions.parquet"
    metrics_path = run / "latency_model" / "metrics.json"
    if preds_path.is_file():
        preds = pd.read_parquet(preds_path)
        metrics = json.loads(metrics_path.read_text())
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for regime, g in preds.groupby("regime"):
            h = g[g["heldout"]]
            ax.scatter(g[~g["heldout"]]["measured_ms"], g[~g["heldout"]]["predicted_ms"], alpha=0.3, s=12)
            m = metrics[regime]["heldout"]
            ax.scatter(h["measured_ms"], h["predicted_ms"], s=22,
                       label=f"{regime}: held-out MAPE {m['mape_pct']:.2f}% (max {m['max_ape_pct']:.1f}%)")
        lim = [preds[["measured_ms", "predicted_ms"]].min().min() * 0.95, preds[["measured_ms", "predicted_ms"]].max().max() * 1.05]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlabel("measured end-to-end ms")
        ax.set_ylabel("predicted ms")
        ax.legend(fontsize=7)
        ax.set_title(f"latency model on {device}")
        p = out / "predicted_vs_measured.png"
        _save(fig, p, pngs)
        numbers["latency_model"] = {k: v["heldout"] | {"naive_mape_pct": v["naive_sum_heldout"]["mape_pct"]} for k, v in metrics.items()}

    # 4. search progress.
    trials_path = run / "search" / "trials.parquet"
    if trials_path.is_file():
        trials = pd.read_parquet(trials_path)
        fig, ax = plt.subplots(figsize=(6, 4))
        for study, g in trials[trials["evaluated"]].groupby("study"):
            g = g.sort_values("trial")
            ax.plot(range(1, len(g) + 1), g["loss"].cummin().map(math.exp), label=study.split("|")[-1])
        ax.set_xlabel("quality evaluations")
        ax.set_ylabel("best validation perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("search progress")
        p = out / "search_progress.png"
        _save(fig, p, pngs)
        numbers["search"] = {"evaluated": int(trials["evaluated"].sum()), "infeasible_skipped": int((~trials["evaluated"]).sum())}
    numbers["device"] = device
    numbers["verified"] = verified.drop(columns=["config"]).to_dict("records") if len(verified) else []
    return pngs, numbers


def _markdown(numbers: dict) -> str:
    lines = [f"# flextron report\n\nDevice: **{numbers['device']}**\n"]
    if "latency_model" in numbers:
        lines += ["## Latency model (held-out end-to-end configs)\n", "| regime | MAPE % | max % | Spearman | naive-sum MAPE % | n |",
                  "|---|---|---|---|---|---|"]
        for k, m in numbers["latency_model"].items():
            lines.append(f"| {k} | {m['mape_pct']:.2f} | {m['max_ape_pct']:.2f} | {m['spearman']:.3f} | {m['naive_mape_pct']:.2f} | {m['n']} |")
    if numbers["verified"]:
        lines += ["\n## Budgets (measured on the device)\n", "| regime | budget ms | predicted ms | measured ms | ppl | within | source |",
                  "|---|---|---|---|---|---|---|"]
        for r in numbers["verified"]:
            lines.append(f"| {r['regime']} | {r['budget_ms']:.3f} | {r['predicted_latency_ms']:.3f} | {r['measured_latency_ms']:.3f} | "
                         f"{r['ppl']:.2f} | {r['within_budget']} | {r['source']} |")
    if "search" in numbers:
        lines.append(f"\nSearch: {numbers['search']['evaluated']} quality evaluations; "
                     f"{numbers['search']['infeasible_skipped']} infeasible proposals rejected by the latency model without evaluation.")
    return "\n".join(lines) + "\n"


def build_report(cfg: ReportConfig) -> dict:
    run = Path(cfg.run)
    if not (run / "profile" / "layers.parquet").is_file():
        raise FlextronError(f"{run / 'profile'} has no profile; run `flextron profile --run {run}` first")
    out = run / "reports"
    out.mkdir(parents=True, exist_ok=True)
    pngs, numbers = _plots(run, out)
    md = _markdown(numbers)
    (out / "summary.md").write_text(md)
    imgs = "\n".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     f"<figcaption>{p.name}</figcaption></figure>" for p in pngs)
    body = "".join(f"<pre>{line}</pre>" if line.startswith("|") else f"<p>{line}</p>" for line in md.splitlines() if line)
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>flextron report</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}pre{{margin:0}}img{{max-width:100%}}</style>"
            f"</head><body>{body}{imgs}</body></html>")
    (out / "index.html").write_text(html)
    return {"report": str(out / "index.html"), "plots": [p.name for p in pngs], "summary": str(out / "summary.md")}

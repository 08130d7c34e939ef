"""`flextron report`: one self-contained HTML page, PNG plots and a Markdown summary of a run.

Reads artifacts from disk only (Parquet/JSON, through the readers that name a corrupt file and the
command that rebuilds it); imports no torch. Strings in the artifacts (regimes, device names,
weights) are data: file names built from them go through `safe_name`, and the page escapes them.
The Markdown summary and the HTML page are rendered from the same tables. The report folder is
built beside RUN/reports and swapped in, so nothing is written anywhere else.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from flextron.errors import FlextronError

WEIGHTS_LABEL = {"elastic": "one-shot, untrained", "trained": "trained elastic model"}


@dataclass(frozen=True)
class ReportConfig:
    run: str = "runs/demo"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


@dataclass
class Figure:
    file: str  # a safe file name inside the report folder
    caption: str


def _num(v, digits: int) -> str:
    """A table cell for a number; `–` where there is none (a fallback never predicted, an undefined rank)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _label(weights: str) -> str:
    return WEIGHTS_LABEL.get(weights, weights)


def _mpl(text) -> str:
    """A data string for matplotlib text: a `$` in a regime or device name must not start math mode."""
    return str(text).replace("$", r"\$")


# ---- reading the run ---------------------------------------------------------------------------------
class _Artifacts:
    """Everything the report reads, each through the readers that name a corrupt file."""

    def __init__(self, run: Path):
        import pandas as pd

        from flextron.rundir import read_json, read_parquet, rebuild_command, require_columns
        from profiler.profile import Profile
        from search.quality import QUALITY_CACHE, read_quality_cache

        self.run = run
        self.profile = Profile.load(run)
        self.layers, self.e2e, self.device = self.profile.layers, self.profile.e2e, self.profile.device_name

        lm = run / "latency_model"
        self.preds, self.metrics = None, {}
        if (lm / "predictions.parquet").is_file() and (lm / "metrics.json").is_file():  # `fit` writes both
            self.preds = require_columns(read_parquet(lm / "predictions.parquet", run), lm / "predictions.parquet",
                                         ["regime", "measured_ms", "predicted_ms", "heldout"], run)
            self.metrics = read_json(lm / "metrics.json", run)

        # Search results, one folder per regime and weights: RUN/search/<regime>/<weights>/.
        self.searches = []  # (regime, weights, trials DataFrame, quality setting or None)
        for path in sorted(run.glob("search/*/*/trials.parquet")):
            trials = require_columns(read_parquet(path, run), path, ["study", "trial", "evaluated", "loss"], run)
            best_path = path.with_name("best.json")
            best = read_json(best_path, run) if best_path.is_file() else {}
            regime = str(best.get("regime") or (trials["regime"].iloc[0] if "regime" in trials and len(trials)
                                                 else path.parent.parent.name))
            weights = str(best.get("weights") or (trials["weights"].iloc[0] if "weights" in trials and len(trials)
                                                   else path.parent.name))
            self.searches.append((regime, weights, trials, best.get("quality_setting")))

        # Losses of every evaluated config, per (regime, weights): each search's own setting, so
        # trained and one-shot qualities are never mixed.
        cache = run / "search" / QUALITY_CACHE
        self.losses: dict[tuple[str, str], dict[str, float]] = {}
        for regime, weights, _, setting in self.searches:
            if setting:
                try:
                    self.losses[(regime, weights)] = read_quality_cache(cache, str(setting))
                except (KeyError, TypeError, AttributeError, ValueError) as e:  # lines of the wrong shape
                    raise FlextronError(f"{cache} is corrupt ({type(e).__name__}: {str(e)[:160]}); rebuild it with "
                                        f"`{rebuild_command(run, cache)}`") from None

        lpath = run / "export" / "lookup.json"
        self.lookup = read_json(lpath, run).get("rows", []) if lpath.is_file() else []
        self.noise = {}
        if self.profile.noise:
            self.noise["profile"] = self.profile.noise
        if (run / "verify" / "noise.json").is_file():
            d = read_json(run / "verify" / "noise.json", run)
            self.noise["verify"] = d.get("regimes", d)

        vpath = run / "verify" / "verified.parquet"
        self.verified = pd.DataFrame()
        if vpath.is_file():
            self.verified = require_columns(read_parquet(vpath, run), vpath,
                                            ["regime", "budget_ms", "predicted_latency_ms", "measured_latency_ms",
                                             "ppl", "within_budget", "source"], run)
            if "weights" not in self.verified.columns:
                self.verified = self.verified.assign(weights="elastic")

    def heldout(self, regime: str) -> dict:
        """The latency model's held-out metrics for `regime`, or a corrupt-file error for metrics.json."""
        from flextron.rundir import rebuild_command

        path = self.run / "latency_model" / "metrics.json"
        try:
            m = self.metrics[regime]
            return {**{k: m["heldout"][k] for k in ("mape_pct", "max_ape_pct", "spearman", "n")},
                    "naive_mape_pct": m["naive_sum_heldout"]["mape_pct"],
                    "noise_floor_pct": m.get("ratio_noise_floor_pct") if m.get("target") == "ratio_to_full"
                    else m.get("noise_floor_pct"), "verdict": m.get("verdict", "no noise floor measured"),
                    "form": m.get("form", "scaled")}
        except (KeyError, TypeError) as e:
            raise FlextronError(f"{path} is corrupt (no held-out metrics for {regime!r}: {type(e).__name__} {e}); "
                                f"rebuild it with `{rebuild_command(self.run, path)}`") from None


# ---- tables ------------------------------------------------------------------------------------------
def _tables(a: _Artifacts) -> list[Table]:
    tables = []
    if a.preds is not None:
        t = Table("Latency model (held-out end-to-end configs)",
                  ["regime", "MAPE %", "max %", "Spearman", "noise floor %", "naive-sum MAPE %", "n", "form", "verdict"],
                  note="Error on measured sub-networks the model was not fitted on, beside the profile's test-retest "
                       "noise floor (two halves of its interleaved rounds): an error at the floor means the machine "
                       "is the limit, far above it the model is wrong. The naive sum of per-layer times is the "
                       "baseline it must beat.")
        for regime in sorted(a.preds["regime"].unique()):
            m = a.heldout(regime)
            t.rows.append([regime, _num(m["mape_pct"], 2), _num(m["max_ape_pct"], 2), _num(m["spearman"], 3),
                           _num(m["noise_floor_pct"], 2), _num(m["naive_mape_pct"], 2), str(m["n"]), str(m["form"]),
                           str(m["verdict"])])
        tables.append(t)
    if len(a.verified):
        t = Table("Budgets (verified on the device in interleaved rounds)",
                  ["regime", "weights", "q", "budget x full", "budget ms", "predicted ms", "measured ms", "ratio to full",
                   "95% upper bound", "rounds", "verdict", "ppl", "source"],
                  note="A budget is a fraction of the full model measured in the same rounds; a pick is within it "
                       "when the upper 95% bootstrap bound of its ratio to the full model (at the quantile q) is.")
        v = a.verified
        for col, default in (("quantile", "p50"), ("budget_frac", math.nan), ("ratio", math.nan), ("ratio_hi", math.nan),
                             ("rounds", 0), ("verdict", "")):
            if col not in v.columns:
                v = v.assign(**{col: default})
        for r in v.sort_values(["regime", "weights", "budget_ms"]).itertuples():
            t.rows.append([r.regime, r.weights, str(r.quantile), _num(r.budget_frac, 3), _num(r.budget_ms, 3),
                           _num(r.predicted_latency_ms, 3), _num(r.measured_latency_ms, 3), _num(r.ratio, 3),
                           _num(r.ratio_hi, 3), str(r.rounds), str(r.verdict) or ("within" if r.within_budget else "over"),
                           _num(r.ppl, 2), str(r.source)])
        tables.append(t)
    if a.searches:
        t = Table("Search", ["regime", "weights", "distinct configs evaluated", "evaluated trials",
                             "infeasible proposals rejected (not evaluated)"],
                  note="Proposals the latency model predicts over budget are rejected without a quality evaluation.")
        for regime, weights, trials, _ in a.searches:
            ev = trials[trials["evaluated"].astype(bool)]
            distinct = ev["config"].nunique() if "config" in ev.columns else len(ev)
            t.rows.append([regime, weights, str(distinct), str(len(ev)), str(int((~trials["evaluated"].astype(bool)).sum()))])
        tables.append(t)
    if a.lookup:
        t = Table("Lookup (what a deployment reads)",
                  ["regime", "weights", "q", "budget x full", "budget ms", "config", "p50 ms", "p90 ms", "ratio to full",
                   "95% upper bound", "ppl", "source"],
                  note="Every row was measured within its budget (times 1 + verify's --tolerance) with 95% "
                       "confidence; more budget never gives a worse config. The reference is the full model "
                       "measured in the same rounds.")
        for r in a.lookup:
            cfg = r.get("config", {})
            key = "m" + ".".join(map(str, cfg.get("mlp_width", []))) + "-h" + ".".join(map(str, cfg.get("heads", [])))
            t.rows.append([str(r.get("regime")), str(r.get("weights")), str(r.get("quantile", "p50")),
                           _num(r.get("budget_frac"), 3), _num(r.get("budget_ms"), 3), key, _num(r.get("latency_ms_p50"), 3),
                           _num(r.get("latency_ms_p90"), 3), _num(r.get("ratio_to_full"), 3), _num(r.get("ratio_hi"), 3),
                           _num(r.get("ppl"), 2), str(r.get("source"))])
        tables.append(t)
    if a.noise:
        t = Table("Measurement noise", ["stage", "regime", "noise floor % (medians)", "noise floor % (ratio to full)",
                                        "rounds"],
                  note="Test-retest error of each stage's own measurements: two halves of its interleaved rounds.")
        for stage, noise in a.noise.items():
            for regime, n in sorted(noise.items()):
                if isinstance(n, dict):
                    t.rows.append([stage, regime, _num(n.get("noise_floor_pct"), 2), _num(n.get("ratio_noise_floor_pct"), 2),
                                   str(n.get("rounds", ""))])
        tables.append(t)
    uniform = a.e2e[a.e2e["uniform"].astype(bool)]
    t = Table("Uniform-width sub-networks", ["regime", "weights", "config", "measured ms", "validation ppl"],
              note="Every layer at the same width: the baseline a searched config must beat.")
    for (regime, weights), losses in sorted(a.losses.items()):
        for r in uniform[uniform["regime"] == regime].sort_values("latency_ms_median").itertuples():
            if r.config_key in losses:
                t.rows.append([regime, weights, str(r.config_key), _num(r.latency_ms_median, 3),
                               _num(math.exp(losses[r.config_key]), 2)])
    if t.rows:
        tables.append(t)
    return tables


# ---- figures -----------------------------------------------------------------------------------------
def _figures(a: _Artifacts, out: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flextron.rundir import safe_name

    figures: list[Figure] = []

    def save(fig, stem: str, caption: str) -> None:
        name, i = safe_name(stem), 2
        while any(f.file == f"{name}.png" for f in figures):  # two regimes may share a safe name
            name, i = f"{safe_name(stem)}-{i}", i + 1
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        figures.append(Figure(f"{name}.png", caption))

    weights_seen = sorted({w for _, w in a.losses} | set(a.verified.get("weights", [])))
    colour = {w: f"C{i}" for i, w in enumerate(weights_seen)}

    # 1. Pareto frontier per regime: perplexity against measured latency, each weights apart.
    for regime, g in a.e2e.groupby("regime"):
        regime = str(regime)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        full_key = g.sort_values("params")["config_key"].iloc[-1]
        for (rk, weights), losses in sorted(a.losses.items()):
            if rk != regime:
                continue
            uni = g[g["uniform"].astype(bool) & g["config_key"].isin(losses)]
            if len(uni):
                ax.scatter(uni["latency_ms_median"], [math.exp(losses[k]) for k in uni["config_key"]],
                           marker="s" if weights == "trained" else "x", c=colour[weights], alpha=0.7,
                           label=f"uniform-width slicing ({_mpl(_label(weights))})")
            full = g[g["config_key"] == full_key]
            if len(full) and full_key in losses:
                ax.scatter(full["latency_ms_median"], [math.exp(losses[full_key])], marker="*", s=200,
                           c=colour[weights], edgecolors="k", label=f"full model ({_mpl(_label(weights))})")
        v = a.verified[a.verified["regime"] == regime] if len(a.verified) else a.verified
        for weights, vw in (v.groupby("weights") if len(v) else []):
            by_router = vw["source"] == "router"
            if (~by_router).any():
                ax.scatter(vw.loc[~by_router, "measured_latency_ms"], vw.loc[~by_router, "ppl"], marker="o",
                           c=colour[weights], edgecolors="k", label=f"search, verified ({_mpl(_label(weights))})")
            if by_router.any():
                ax.scatter(vw.loc[by_router, "measured_latency_ms"], vw.loc[by_router, "ppl"], marker="D",
                           c=colour[weights], edgecolors="k", label=f"router-chosen, verified ({_mpl(_label(weights))})")
        for b in sorted(set(v["budget_ms"])) if len(v) else []:
            ax.axvline(b, c="C3", alpha=0.15)
        if ax.has_data() and any(ax.get_legend_handles_labels()[1]):
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"measured latency (ms), {_mpl(regime)}")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"Pareto frontier on {_mpl(a.device)}", fontsize=9)
        save(fig, f"pareto_{regime}", f"Pareto frontier: validation perplexity against measured latency, "
                                      f"{regime} on {a.device}")

    # 2. Layer x width heatmaps per regime.
    ok = a.layers[~a.layers["anchor"].astype(bool) & (a.layers["status"] == "ok")]
    for regime, g in ok.groupby("regime"):
        regime = str(regime)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, kind in zip(axes, ("mlp", "attn")):
            piv = g[g["kind"] == kind].pivot_table(index="layer", columns="width", values="latency_ms_median")
            if piv.empty:
                ax.set_axis_off()
                continue
            im = ax.imshow(piv.values, aspect="auto", cmap="viridis", origin="lower")
            ax.set_xticks(range(len(piv.columns)), [str(c) for c in piv.columns], rotation=60, fontsize=7)
            ax.set_xlabel("MLP width" if kind == "mlp" else "attention heads")
            ax.set_ylabel("layer")
            ax.set_title(f"{kind} ms")
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{_mpl(regime)} on {_mpl(a.device)}", fontsize=9)
        save(fig, f"heatmap_{regime}", f"Per-layer latency (ms) by width, {regime} on {a.device}")

    # 3. Predicted against measured end-to-end latency, held-out configs marked.
    if a.preds is not None and len(a.preds):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for regime, g in a.preds.groupby("regime"):
            held = g["heldout"].astype(bool)
            m = a.heldout(str(regime))
            ax.scatter(g.loc[~held, "measured_ms"], g.loc[~held, "predicted_ms"], alpha=0.3, s=12)
            ax.scatter(g.loc[held, "measured_ms"], g.loc[held, "predicted_ms"], s=22,
                       label=f"{_mpl(regime)}: held-out MAPE {_num(m['mape_pct'], 2)}% (max {_num(m['max_ape_pct'], 1)}%)")
        both = a.preds[["measured_ms", "predicted_ms"]]
        lim = [both.min().min() * 0.95, both.max().max() * 1.05]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlabel("measured end-to-end ms")
        ax.set_ylabel("predicted ms")
        ax.legend(fontsize=7)
        ax.set_title(f"latency model on {_mpl(a.device)}", fontsize=9)
        save(fig, "predicted_vs_measured", f"Latency model: predicted against measured end-to-end latency on {a.device}")

    # 4. Search progress, one figure per regime and weights.
    for regime, weights, trials, _ in a.searches:
        ev = trials[trials["evaluated"].astype(bool) & trials["loss"].notna()]
        if ev.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for study, g in ev.groupby("study"):
            g = g.sort_values("trial")
            ax.plot(range(1, len(g) + 1), g["loss"].astype(float).cummin().map(math.exp),
                    label=_mpl(str(study).split("|")[-1]))
        ax.set_xlabel("evaluated trials")
        ax.set_ylabel("best validation perplexity")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"search progress: {_mpl(regime)}, {_mpl(weights)} weights", fontsize=9)
        save(fig, f"search_{regime}_{weights}", f"Search progress: {regime}, {weights} weights ({_label(weights)})")
    return figures


# ---- rendering ---------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _markdown(device: str, tables: list[Table], figures: list[Figure]) -> str:
    lines = ["# flextron report", "", f"Device: **{_md_cell(device)}**", ""]
    for t in tables:
        lines += [f"## {t.title}", ""] + ([t.note, ""] if t.note else [])
        lines += ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{_md_cell(f.caption)}]({f.file})" for f in figures] + [""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .6em}"
        "td{text-align:right}td:first-child,td:nth-child(2){text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}figcaption{font-size:.9em;color:#444}.note{color:#555;font-size:.9em}")


def _html(device: str, tables: list[Table], figures: list[Figure], out: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             # Defence in depth: the page needs no script and loads nothing, so allow neither.
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">",
             f"<title>flextron report: {e(device)}</title><style>{_CSS}</style></head><body>",
             "<h1>flextron report</h1>", f"<p>Device: <strong>{e(device)}</strong></p>"]
    for t in tables:
        parts.append(f"<h2>{e(t.title)}</h2>")
        if t.note:
            parts.append(f"<p class='note'>{e(t.note)}</p>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in t.rows]
        parts.append("</tbody></table>")
    if figures:
        parts.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode((out / f.file).read_bytes()).decode()
        parts.append(f"<figure><img alt=\"{e(f.caption)}\" src=\"data:image/png;base64,{data}\">"
                     f"<figcaption>{e(f.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(cfg: ReportConfig) -> dict:
    from flextron.rundir import fresh_tmp_dir, swap_in

    run = Path(cfg.run)
    a = _Artifacts(run)
    tables = _tables(a)
    final = run / "reports"
    tmp = fresh_tmp_dir(final)
    figures = _figures(a, tmp)
    (tmp / "summary.md").write_text(_markdown(a.device, tables, figures))
    (tmp / "index.html").write_text(_html(a.device, tables, figures, tmp))
    swap_in(tmp, final)
    return {"report": str(final / "index.html"), "plots": [f.file for f in figures], "summary": str(final / "summary.md")}

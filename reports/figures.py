"""The report's plots: matplotlib with the Agg backend, written as PNG into the report folder.

Each function draws one figure from the run's artifacts and returns its `Figure` (file and caption),
or None when there is nothing to draw. Strings from artifacts reach matplotlib only through `_mpl`
(a `$` would start math mode) and file names only through `safe_name`.
"""

from __future__ import annotations

import math
from pathlib import Path

from reports.artifacts import Artifacts, RouterRun, weights_label
from reports.page import Figure

MARKERS = {"elastic": "o", "trained": "s"}


def _mpl(text) -> str:
    """A data string for matplotlib text: a `$` in a regime or device name must not start math mode."""
    return str(text).replace("$", r"\$")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.25,
                         "legend.fontsize": 8, "legend.framealpha": 0.9, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


class Plots:
    """Writes figures into the report folder under unique safe names."""

    def __init__(self, a: Artifacts, out: Path, dpi: int):
        self.a, self.out, self.dpi = a, out, dpi
        self.files: set[str] = set()
        weights = sorted({w for _, w in a.losses} | set(a.verified.get("weights", [])) | {r.weights for r in a.routers})
        self.colour = {w: f"C{i}" for i, w in enumerate(weights or ["elastic"])}

    def save(self, fig, stem: str, caption: str) -> Figure:
        from flextron.rundir import safe_name

        plt = _plt()
        name, i = safe_name(stem), 2
        while f"{name}.png" in self.files:  # two regimes may share a safe name
            name, i = f"{safe_name(stem)}-{i}", i + 1
        self.files.add(f"{name}.png")
        fig.savefig(self.out / f"{name}.png", dpi=self.dpi, bbox_inches="tight")
        plt.close(fig)
        return Figure(f"{name}.png", caption)

    # ---- Pareto frontier ---------------------------------------------------------------------------------
    def pareto(self, regime: str, routers: list[RouterRun], full_ms: float | None) -> Figure | None:
        """Validation perplexity against latency as a fraction of the full model measured in the same
        session (drift cancels in the ratio, so points measured by profile and by verify compare):
        uniform baselines and their lower envelope, the full model, verified search and router picks,
        lookup rows, and the static router's answers that search evaluated (their latency predicted)."""
        a, plt = self.a, _plt()
        g = a.e2e[(a.e2e["regime"] == regime) & (a.e2e["status"] == "ok")]
        if not full_ms:
            return None
        fig, ax = plt.subplots(figsize=(8.2, 4.6))
        full_key = a.spec.full().key if a.spec is not None else g.sort_values("params")["config_key"].iloc[-1]

        def profile_ratio(rows):
            """Each row's ratio to the full model from the profile's interleaved rounds, else ms / full ms."""
            by_ms = rows["latency_ms_median"] / full_ms
            return rows["ratio_to_full"].where(rows["ratio_to_full"].notna(), by_ms) if "ratio_to_full" in rows \
                else by_ms

        for (rk, weights), losses in sorted(a.losses.items()):
            if rk != regime:
                continue
            c, lab = self.colour.get(weights, "C0"), _mpl(weights_label(weights))
            uni = g[g["uniform"].astype(bool) & g["config_key"].isin(losses)].sort_values("latency_ms_median")
            if len(uni):
                x, p = profile_ratio(uni), [math.exp(losses[k]) for k in uni["config_key"]]
                ax.scatter(x, p, marker="x", c=c, alpha=0.55, s=28, label=f"uniform widths ({lab})")
                best, env = math.inf, []  # the lower envelope: the best perplexity at each latency or less
                for xi, yi in sorted(zip(x, p)):
                    best = min(best, yi)
                    env.append((xi, best))
                ax.step(*zip(*env), where="post", c=c, alpha=0.35, lw=1)
            full = g[g["config_key"] == full_key]
            if len(full) and full_key in losses:
                ax.scatter([1.0], [math.exp(losses[full_key])], marker="*", s=220, c=c, edgecolors="k", zorder=4,
                           label=f"full model ({lab})")
            for r in routers:
                if r.regime != regime or r.weights != weights:
                    continue
                pts = [(s["predicted_ms"] / full_ms, math.exp(losses[_key(s.get("config"))]))
                       for s in r.meta.get("static_answers", [])
                       if _finite(s.get("predicted_ms")) and _key(s.get("config")) in losses]
                if pts:
                    ax.scatter(*zip(*pts), marker="^", facecolors="none", edgecolors=c, s=60, zorder=3,
                               label=f"static router answer, latency predicted ({lab})")
        v = a.verified[a.verified["regime"] == regime] if len(a.verified) else a.verified
        for weights, vw in (v.groupby("weights") if len(v) else []):
            c, lab = self.colour.get(weights, "C0"), _mpl(weights_label(weights))
            ref = next((vw[c] for c in ("measured_full_ms", "reference_full_ms") if c in vw and vw[c].notna().all()),
                       full_ms)
            x = vw["measured_latency_ms"] / ref
            for mask, marker, what in ((vw["source"] != "router", "o", "search pick"),
                                       (vw["source"] == "router", "D", "router pick")):
                if mask.any():
                    ax.scatter(x[mask], vw.loc[mask, "ppl"], marker=marker, s=50, c=c, edgecolors="k", zorder=5,
                               label=f"{what}, verified ({lab})")
        rows = [r for r in a.lookup if r.regime == regime]
        if rows:
            ax.scatter([r.measured_latency_ms / (r.measured_full_ms or r.reference_full_ms or full_ms) for r in rows],
                       [r.ppl for r in rows],
                       s=170, facecolors="none", edgecolors="C3", lw=1.5, zorder=6,
                       label="lookup row (what a deployment reads)")
        if not ax.has_data():
            plt.close(fig)
            return None
        for f in sorted({float(f) for f in v["budget_frac"] if _finite(f)}) if len(v) else []:
            ax.axvline(f, c="C3", alpha=0.35, ls=":", lw=1)
            ax.annotate(f"budget {f:.2g}", (f, 1), xycoords=("data", "axes fraction"), fontsize=7, c="C3",
                        ha="right", va="top", rotation=90, xytext=(-2, -3), textcoords="offset points")
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_xlabel("latency per step × the full model measured in the same session (median)")
        ax.set_ylabel("validation perplexity (log)")
        top = ax.secondary_xaxis("top", functions=(lambda r: r * full_ms, lambda m: m / full_ms))
        top.set_xlabel(f"ms, at the profile's full model ({full_ms:.4g} ms)", fontsize=8)
        ax.set_title(f"{_mpl(regime)} on {_mpl(a.device)}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        return self.save(fig, f"pareto_{regime}",
                         f"Pareto frontier, {regime}: validation perplexity against latency measured on {a.device}, "
                         "as a fraction of the full model measured in the same session (so the profile's and "
                         "verify's measurements compare). Uniform-width slicing is the baseline (its lower envelope "
                         "drawn as steps); a searched or routed pick pays off below that envelope. Dotted lines: "
                         "the budgets.")

    # ---- per-layer heatmap -------------------------------------------------------------------------------
    def heatmap(self, regime: str) -> Figure | None:
        a, plt = self.a, _plt()
        ok = a.layers[(a.layers["regime"] == regime) & ~a.layers["anchor"].astype(bool) & (a.layers["status"] == "ok")]
        kinds = [k for k in ("mlp", "attn") if (ok["kind"] == k).any()]
        if not kinds:
            return None
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.2), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            piv = ok[ok["kind"] == kind].pivot_table(index="layer", columns="width", values="latency_ms_median")
            im = ax.imshow(piv.values, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
            ax.set_xticks(range(len(piv.columns)), [str(c) for c in piv.columns],
                          rotation=45 if len(piv.columns) > 6 else 0)
            step = max(1, len(piv.index) // 10)
            ax.set_yticks(range(0, len(piv.index), step), [str(i) for i in piv.index[::step]])
            ax.set_xlabel("MLP width (neurons)" if kind == "mlp" else "attention heads")
            ax.set_ylabel("layer")
            ax.set_title("MLP" if kind == "mlp" else "attention")
            ax.grid(False)
            fig.colorbar(im, ax=ax, label="ms per layer (median)")
        fig.suptitle(f"{_mpl(regime)} on {_mpl(a.device)}", fontsize=10)
        return self.save(fig, f"heatmap_{regime}", f"Per-layer latency by width, {regime} on {a.device}: each cell "
                                                   "is one layer's MLP or attention block measured alone.")

    # ---- latency model -----------------------------------------------------------------------------------
    def predicted_vs_measured(self, regime: str) -> Figure | None:
        a, plt = self.a, _plt()
        g = a.preds[a.preds["regime"] == regime] if a.preds is not None else None
        if g is None or g.empty:
            return None
        m = a.heldout(regime)
        fig, ax = plt.subplots(figsize=(4.9, 4.3))
        held = g["heldout"].astype(bool)
        lo = float(g[["measured_ms", "predicted_ms"]].min().min()) * 0.97
        hi = float(g[["measured_ms", "predicted_ms"]].max().max()) * 1.03
        floor = m["noise_floor_pct"]
        if isinstance(floor, (int, float)) and math.isfinite(floor):
            ax.fill_between([lo, hi], [lo * (1 - floor / 100), hi * (1 - floor / 100)],
                            [lo * (1 + floor / 100), hi * (1 + floor / 100)], color="0.5", alpha=0.15, lw=0,
                            label=f"noise floor ±{floor:.2f}%")
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.scatter(g.loc[~held, "measured_ms"], g.loc[~held, "predicted_ms"], s=14, c="C0", alpha=0.35,
                   label=f"fitted on ({int((~held).sum())})")
        ax.scatter(g.loc[held, "measured_ms"], g.loc[held, "predicted_ms"], s=30, c="C1", edgecolors="k", lw=0.5,
                   label=f"held out ({int(held.sum())}): error {m['mape_pct']:.2f}% (max {m['max_ape_pct']:.2f}%)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("measured end-to-end ms (median)")
        ax.set_ylabel("predicted ms")
        ax.set_title(f"{_mpl(regime)} on {_mpl(a.device)}")
        ax.legend(loc="upper left")
        return self.save(fig, f"predicted_vs_measured_{regime}",
                         f"Latency model, {regime}: predicted against measured end-to-end latency. The grey band is "
                         "the measurement's test-retest noise floor; held-out sub-networks were not fitted on.")

    # ---- search ------------------------------------------------------------------------------------------
    def search_progress(self, regime: str, weights: str, trials) -> Figure | None:
        plt = _plt()
        ev = trials[trials["evaluated"].astype(bool) & trials["loss"].notna()]
        if ev.empty:
            return None
        fig, ax = plt.subplots(figsize=(6.2, 3.6))
        for study, g in ev.groupby("study"):
            g = g.sort_values("trial")
            budget = g["budget_ms"].iloc[0] if "budget_ms" in g.columns else None
            label = (f"budget {budget:.4g} ms" if isinstance(budget, (int, float)) and math.isfinite(budget)
                     else _mpl(str(study).split("|")[-1]))
            ax.plot(range(1, len(g) + 1), g["loss"].astype(float).cummin().map(math.exp), marker=".", label=label)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("evaluated trials")
        ax.set_ylabel("best validation perplexity so far")
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.legend()
        ax.set_title(f"{_mpl(regime)}, {_mpl(weights)} weights")
        return self.save(fig, f"search_{regime}_{weights}",
                         f"Search progress: {regime}, {weights} weights ({weights_label(weights)}): the best "
                         "perplexity found after each evaluated trial, one line per budget.")

    # ---- routers -----------------------------------------------------------------------------------------
    def router_curve(self, r: RouterRun) -> Figure | None:
        plt = _plt()
        meta = r.meta
        static = [s for s in meta.get("static_answers", []) if _finite(s.get("router_frac", s.get("budget_frac")))
                  and _finite(s.get("expected_frac"))]
        dyn = [d for d in meta.get("dynamic_calibration", []) if _finite(d.get("router_frac")) and
               _finite(d.get("expected_frac"))]
        hist = [h for h in meta.get("static_history", []) if _finite(h.get("step")) and _finite(h.get("loss"))]
        if not (static or dyn or hist):
            return None
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [s.get("router_frac", s.get("budget_frac")) for s in static] + [d["router_frac"] for d in dyn]
        if xs:
            lo, hi = min(xs + [1.0]), max(xs + [1.0])
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="the budget")
        if static:
            ax.plot([s.get("router_frac", s.get("budget_frac")) for s in static], [s["expected_frac"] for s in static],
                    "o-", label="static router: its config's latency")
        if dyn:
            ax.plot([d["router_frac"] for d in dyn], [d["expected_frac"] for d in dyn], "s-",
                    label="dynamic router, calibrated: expected latency")
        served = [d for d in dyn if d.get("serve") == "dynamic"]
        if served:
            ax.plot([d["router_frac"] for d in served], [d["expected_frac"] for d in served], "s", ms=10, mfc="none",
                    label="served dynamic (measured better than static)")
        ax.set_xlabel("budget (fraction of the full model)")
        ax.set_ylabel("latency of the answer (fraction)")
        ax.set_title("what each router gives for a budget")
        ax.legend(loc="upper left")
        if hist:
            bx.plot([h["step"] for h in hist], [h["loss"] for h in hist], "-", label="loss (quality + latency penalty)")
            sur = [(h["step"], h["surrogate"]) for h in hist if _finite(h.get("surrogate"))]
            if sur:
                bx.plot(*zip(*sur), "--", label="surrogate's predicted LM loss")
            bx.set_xlabel("static router training step")
            bx.set_ylabel("loss")
            bx.set_title("static router training")
            bx.legend()
        else:
            bx.set_axis_off()
        fig.suptitle(f"{_mpl(r.regime)}, {_mpl(weights_label(r.weights))}", fontsize=10)
        source = str(meta.get("table", {}).get("source", "")) if isinstance(meta.get("table"), dict) else ""
        return self.save(fig, f"router_{r.regime}_{r.weights}",
                         f"Routers, {r.regime}, {r.weights} weights: the latency (as a fraction of the full model, "
                         f"from the latency table{': ' + source if source else ''}) of what each router answers for "
                         "a budget; at or under the dashed line meets it. Right: the static router's training.")

    # ---- training ----------------------------------------------------------------------------------------
    def training_curve(self, df) -> Figure | None:
        plt = _plt()
        if df is None or df.empty:
            return None
        by_tokens = "tokens" in df.columns and df["tokens"].notna().all()
        x = df["tokens"] if by_tokens else df["step"]
        fig, ax = plt.subplots(figsize=(6.8, 3.6))
        for col, label in (("loss_full", "full model"), ("loss_smallest", "smallest sub-network"),
                           ("loss_random", "random sub-networks")):
            if col in df.columns and df[col].notna().any():
                ax.plot(x, df[col], label=label, marker="." if len(df) < 40 else None)
        ax.set_xlabel("training tokens" if by_tokens else "step")
        ax.set_ylabel("distillation loss")
        ax.legend()
        ax.set_title("elastic continued training (sandwich distillation)")
        return self.save(fig, "training", "Training: the loss of the full model, the smallest sub-network and "
                                          "sampled ones at each step (distillation from the frozen original).")

    # ---- energy ------------------------------------------------------------------------------------------
    def energy(self, regime: str, rows) -> Figure | None:
        plt = _plt()
        if rows.empty:
            return None
        fig, ax = plt.subplots(figsize=(6.2, 3.8))
        ax.scatter(rows["latency_ms_median"], rows["energy_mj_per_token"], c="C2")
        ax.set_xlabel("measured latency per step (ms, median)")
        ax.set_ylabel("energy (mJ per token)")
        ax.set_title(f"{_mpl(regime)} on {_mpl(self.a.device)}")
        return self.save(fig, f"energy_{regime}", f"Energy per token against latency, uniform-width sub-networks, "
                                                  f"{regime} (NVML energy counter).")

    # ---- drift -------------------------------------------------------------------------------------------
    def drift(self, regime: str) -> Figure | None:
        a, plt = self.a, _plt()
        if "measured_at" not in a.layers.columns:
            return None
        anc = a.layers[(a.layers["regime"] == regime) & a.layers["anchor"].astype(bool) & (a.layers["status"] == "ok")
                       & a.layers["measured_at"].notna()].sort_values("measured_at")
        if len(anc) < 2:
            return None
        t = (anc["measured_at"] - anc["measured_at"].iloc[0]) / 60
        med = float(anc["latency_ms_median"].median())
        dev = 100 * (anc["latency_ms_median"] / med - 1)
        fig, ax = plt.subplots(figsize=(5.6, 2.8))
        ax.plot(t, dev, "o-", label="anchor cell, re-measured")
        if "throttled" in anc.columns and anc["throttled"].fillna(False).astype(bool).any():
            th = anc["throttled"].fillna(False).astype(bool)
            ax.scatter(t[th], dev[th], c="C3", zorder=3, label="clocks throttled")
        ax.axhline(0, c="k", lw=0.8, ls="--")
        ax.set_xlabel("minutes into the sweep")
        ax.set_ylabel("drift from its median (%)")
        ax.set_title(f"{_mpl(regime)} on {_mpl(a.device)}")
        ax.legend()
        return self.save(fig, f"drift_{regime}", f"Drift, {regime}: one layer cell re-measured through the sweep; "
                                                 "layer cells are corrected by it (linear in time between anchors).")


def _plain_log(axis) -> None:
    """Log-axis tick labels as plain numbers (60, 100, 600), not 6×10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _key(config) -> str:
    """The config key (as `SubnetConfig.key`) of a config dict, or "" for a malformed one."""
    if not isinstance(config, dict):
        return ""
    return "m" + ".".join(map(str, config.get("mlp_width", []))) + "-h" + ".".join(map(str, config.get("heads", [])))

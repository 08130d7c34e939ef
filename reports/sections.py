"""The report's sections, built from a run's artifacts: headline, lookup, verified budgets, Pareto
frontier, routers, latency model, per-layer latency, search, training, energy, measurement quality.

A section whose data the run does not hold yet is one line naming the command that produces it.
Numbers carry their unit in the column header and a precision fitted to what they measure.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict

from reports.artifacts import Artifacts, RouterRun, weights_label
from reports.figures import Plots
from reports.page import Cell, Page, Section, Table, count, frac, ms, num, pct, ppl

ENGINE_LABEL = {"torch": "transformers", "llamacpp": "llama.cpp"}

LOOKUP_HEADER = ["budget ms", "budget × full", "q", "sub-network", "measured ms at q", "× full", "95% upper",
                 "perplexity", "source"]
VERIFY_HEADER = ["budget ms", "budget × full", "q", "sub-network", "predicted ms", "measured ms", "× full",
                 "95% upper", "verdict", "perplexity", "source"]
HEADLINE_HEADER = ["regime", "full model ms", "fastest sub-network ms", "fastest × full", "latency model error %",
                   "noise floor %", "latency model", "picks within budget"]


def _cmd(a: Artifacts, stage: str) -> str:
    from flextron.rundir import STAGES

    return STAGES[stage].format(run=a.run)


def describe(config, spec) -> Cell:
    """A sub-network in a few words (uniform or mixed widths, its share of the parameters); the
    per-layer config is the cell's hover text."""
    from flextron.spec import SubnetConfig

    try:
        c = config if isinstance(config, SubnetConfig) else SubnetConfig.from_dict(config)
    except Exception:  # noqa: BLE001 - a malformed config in an artifact is shown, not fatal
        return Cell(str(config)[:60])
    full_heads = spec.num_heads if spec is not None else max(c.heads)
    act = c.active_layers
    widths, heads = [c.mlp_width[l] for l in act], [c.heads[l] for l in act]
    if c.is_uniform():
        parts = ["uniform" if not c.skip else "depth", f"MLP {widths[0]}", f"{heads[0]}/{full_heads} heads"]
    else:
        parts = ["mixed", f"MLP ~{sum(widths) / len(widths):.0f}", f"~{sum(heads) / len(heads):.1f}/{full_heads} heads"]
    if c.skip:
        parts.insert(1, f"{len(act)}/{c.num_layers} layers (skips {','.join(map(str, c.skip))})")
    if spec is not None and c.num_layers == spec.num_layers:
        parts.append(f"{100 * c.param_count(spec) / spec.full().param_count(spec):.0f}% params")
    text = " · ".join(parts)
    return Cell(text, title=c.key, nowrap=True)


def _json_config(text):
    import json

    try:
        return json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError:
        return text


def _groups(items, key):
    out = defaultdict(list)
    for it in items:
        out[key(it)].append(it)
    return sorted(out.items())


# ---- the top of the page -----------------------------------------------------------------------------
def about(a: Artifacts) -> tuple[str, list[str]]:
    """(title, "what this is" facts) of the page."""
    d = a.profile.device
    model = str(a.convert.get("model") or "a model")
    title = f"flextron report: {model} on {a.device}"
    facts = []
    if a.spec is not None:
        facts.append(f"{model} ({a.spec.family}, {a.spec.num_layers} layers, MLP widths "
                     f"{a.spec.mlp_widths[0][0]}–{a.spec.mlp_widths[0][-1]}, {a.spec.head_counts[0][0]}–"
                     f"{a.spec.head_counts[0][-1]} heads)")
    where = [str(d[k]) for k in ("device",) if d.get(k)]
    if d.get("cores"):
        where.append(f"{d['cores']} cores")
    threads = d.get("threads_choice") or d.get("torch_threads")
    if threads:
        where.append(f"{threads} thread{'s' if threads != 1 else ''}")
    facts.append(f"device: {a.device}" + (f" ({', '.join(where)})" if where else ""))
    engine = ENGINE_LABEL.get(a.profile.engine, a.profile.engine)
    llama = a.profile.engine == "llamacpp"
    version = (f"llama-cpp-python {d['llama_cpp_python']}" if llama and d.get("llama_cpp_python")
               else f"torch {d['torch']}" if not llama and d.get("torch") else "")
    facts.append(f"engine: {engine}" + (f" ({version})" if version else ""))
    regimes = a.profile.regimes
    facts.append(f"regime{'s' if len(regimes) != 1 else ''}: {', '.join(regimes)}")
    facts.append("weights: " + ("one-shot and trained" if a.trained else "one-shot (untrained)"))
    bridges = a.convert_report.get("bridges")
    if a.spec is not None and a.convert_report:
        facts.append(f"skipped layers: a linear bridge in their place in {bridges['layers']} of {a.spec.num_layers} "
                     "layers" if bridges else "skipped layers: dropped (converted without linear bridges)")
    date = a.measured_date()
    if date:
        facts.append(f"profiled {date}")
    if d.get("git_hash"):
        facts.append(f"flextron {str(d['git_hash'])[:9]}")
    return title, facts


# ---- sections ----------------------------------------------------------------------------------------
def headline(a: Artifacts) -> Section:
    s = Section("headline", "Headline", intro="The full model and the fastest sub-network as measured end to end; "
                "the latency model's error on sub-networks it was not fitted on, beside the measurement's noise "
                "floor; and how many budget picks verify measured within their budget (95% confidence).")
    t = Table(HEADLINE_HEADER)
    for regime in a.profile.regimes:
        full = a.full_ms(regime)
        ok = a.e2e[(a.e2e["regime"] == regime) & (a.e2e["status"] == "ok")]
        fastest = ok.sort_values("latency_ms_median").iloc[0] if len(ok) else None
        fast_ms = float(fastest["latency_ms_median"]) if fastest is not None else None
        ratio = fastest.get("ratio_to_full") if fastest is not None else None
        if not (isinstance(ratio, float) and math.isfinite(ratio)) and fast_ms and full:
            ratio = fast_ms / full
        err = floor = None
        verdict = "not fitted yet"
        if a.preds is not None and regime in a.metrics:
            m = a.heldout(regime)
            err, floor, verdict = m["mape_pct"], m["noise_floor_pct"], str(m["verdict"]).split(" (")[0]
        v = a.verified[a.verified["regime"] == regime] if len(a.verified) else a.verified
        if len(v):
            verified = "; ".join(f"{int(g['within_budget'].astype(bool).sum())} of {len(g)}"
                                 + (f" ({weights_label(w)})" if v["weights"].nunique() > 1 else "")
                                 for w, g in v.groupby("weights"))
        else:
            verified = "not verified yet"
        t.rows.append([regime, ms(full), ms(fast_ms), frac(ratio), pct(err), pct(floor), verdict, verified])
    return s.add(t)


def lookup(a: Artifacts) -> Section:
    s = Section("lookup", "Lookup table", intro="What a deployment reads (`flextron lookup --run RUN --budget-ms X`): "
                "for each budget, the best sub-network measured within it with 95% confidence, against the full "
                "model measured in the same rounds. More budget never gives a worse sub-network. Hover a "
                "sub-network for its per-layer widths.")
    if not a.lookup:
        s.missing = f"`{_cmd(a, 'export')}` writes the budget-to-config lookup (after search and verify)"
        return s
    for (regime, weights), rows in _groups(a.lookup, lambda r: (r.regime, r.weights)):
        t = Table(LOOKUP_HEADER, caption=f"{regime}, {weights_label(weights)} weights")
        for r in sorted(rows, key=lambda r: (r.quantile, r.budget_ms)):
            at_q = r.latency_at_quantile()
            t.rows.append([ms(r.budget_ms), frac(r.budget_frac), r.quantile, describe(r.config, a.spec),
                           ms(at_q if at_q is not None else r.measured_latency_ms), frac(r.ratio_to_full),
                           frac(r.ratio_hi), ppl(r.ppl), r.source])
        s.add(t)
    return s


def verify(a: Artifacts) -> Section:
    s = Section("verify", "Verified budgets", intro="Every pick re-measured on the device in interleaved rounds, "
                "with the full model as the reference in each round. A pick is within its budget when the upper "
                "95% bootstrap bound of its ratio to the full model (at quantile q) is.")
    if not len(a.verified):
        s.missing = f"`{_cmd(a, 'verify')}` re-measures the search's picks against the full model"
        return s
    v = a.verified
    for (regime, weights), g in v.groupby(["regime", "weights"], sort=True):
        rounds = sorted({int(x) for x in g["rounds"] if isinstance(x, numbers.Real) and math.isfinite(x) and x > 0})
        t = Table(VERIFY_HEADER, caption=f"{regime}, {weights_label(str(weights))} weights"
                  + (f", {'/'.join(map(str, rounds))} interleaved rounds" if rounds else ""))
        for r in g.sort_values("budget_ms").itertuples():
            t.rows.append([ms(r.budget_ms), frac(r.budget_frac), str(r.quantile),
                           describe(_json_config(r.config), a.spec), ms(r.predicted_latency_ms),
                           ms(r.measured_latency_ms), frac(r.ratio), frac(r.ratio_hi),
                           str(r.verdict) or ("within" if r.within_budget else "over"), ppl(r.ppl), str(r.source)])
        s.add(t)
    return s


def pareto(a: Artifacts, plots: Plots) -> Section:
    s = Section("pareto", "Pareto frontier", intro="Quality against measured latency. The uniform-width sub-networks "
                "(every layer at the same width) are the baseline a searched or routed config must beat.")
    for regime in a.profile.regimes:
        s.add(plots.pareto(regime, [r for r in a.routers if r.regime == regime], a.full_ms(regime)))
    for (regime, weights), losses in sorted(a.losses.items()):
        full = a.full_ms(regime)
        t = Table(["sub-network", "measured ms", "× full", "achieved GB/s", "achieved TFLOP/s", "perplexity"],
                  collapsed=True, caption=f"Uniform-width baselines, {regime}, {weights_label(weights)} weights")
        for r in a.profile.uniform(regime).itertuples():
            if r.config_key in losses:
                t.rows.append([describe(_json_config(r.config), a.spec), ms(r.latency_ms_median),
                               frac(r.latency_ms_median / full if full else None),
                               num(getattr(r, "achieved_gbps", None), 1), num(getattr(r, "achieved_tflops", None), 3),
                               ppl(math.exp(losses[r.config_key]))])
        if t.rows:
            s.add(t)
    if not s.blocks:
        s.missing = f"`{_cmd(a, 'search')}` evaluates the quality the frontier needs"
    return s


def routers(a: Artifacts, plots: Plots) -> Section:
    s = Section("routers", "Routers", intro="The trained routers map a budget to widths: the static router to one "
                "config per budget, the dynamic router per token (calibrated per budget on held-apart text). "
                "Budgets here are fractions of the latency table's full model.")
    if not a.routers:
        s.missing = (f"`{_cmd(a, 'router')}` trains the static and dynamic routers (after `flextron fit`; "
                     "search then seeds them)")
        return s
    for r in a.routers:
        s.add(*_router_blocks(a, r, plots))
    return s


def _router_blocks(a: Artifacts, r: RouterRun, plots: Plots) -> list:
    meta = r.meta
    table = meta.get("table") if isinstance(meta.get("table"), dict) else {}
    sur = meta.get("surrogate") if isinstance(meta.get("surrogate"), dict) else {}
    facts = [f"{r.regime}, {weights_label(r.weights)} weights", f"latency table: {table.get('source', 'unknown')}"]
    if isinstance(sur.get("heldout_mean_rel_err"), (int, float)):
        facts.append(f"surrogate's held-out loss error {100 * sur['heldout_mean_rel_err']:.2f}% "
                     f"({sur.get('heldout', '?')} configs)")
    if meta.get("seconds") is not None:
        facts.append(f"trained in {meta['seconds']} s")
    by_frac: dict[float, dict] = {}
    for st in meta.get("static_answers", []):
        f = st.get("router_frac", st.get("budget_frac"))
        if isinstance(f, (int, float)):
            by_frac.setdefault(round(float(f), 4), {})["static"] = st
    for d in meta.get("dynamic_calibration", []):
        if isinstance(d.get("router_frac"), (int, float)):
            by_frac.setdefault(round(float(d["router_frac"]), 4), {})["dynamic"] = d
    t = Table(["budget × table full", "budget ms", "static: sub-network", "static: predicted ms", "static: × full",
               "dynamic: expected × full", "dynamic meets budget", "served", "dynamic: measured × full, loss",
               "static: measured × full, loss"], caption="What each router answers per budget, and what is served: "
              "dynamic routing only where it measured better than the static configs (loss on calibration text, "
              "latency measured beside the full model)")
    for f, pt in sorted(by_frac.items()):
        st, dy = pt.get("static", {}), pt.get("dynamic", {})
        budget_ms = st.get("budget_ms", dy.get("budget_ms"))
        sel = dy.get("selection") if isinstance(dy.get("selection"), dict) else {}
        t.rows.append([frac(f), ms(budget_ms), describe(st["config"], a.spec) if "config" in st else "–",
                       ms(st.get("predicted_ms")), frac(st.get("expected_frac")), frac(dy.get("expected_frac")),
                       ("yes" if dy["meets"] else "no") if "meets" in dy else "–", str(dy.get("serve", "–")),
                       _measured(sel.get("dynamic")), _measured(sel.get("static"))])
    noise = (meta.get("selection") or {}).get("noise") if isinstance(meta.get("selection"), dict) else None
    if isinstance(noise, dict) and isinstance(noise.get("ratio_noise_floor_pct"), (int, float)):
        facts.append(f"dynamic-vs-static timing: ratio noise floor {noise['ratio_noise_floor_pct']:.2f}% over "
                     f"{noise.get('rounds', '?')} rounds")
    return [" · ".join(facts), t if t.rows else None, plots.router_curve(r)]


def _measured(m) -> str:
    """`ratio×, loss` of one side of the dynamic-vs-static comparison, or – when not measured."""
    if not isinstance(m, dict) or not isinstance(m.get("loss"), (int, float)):
        return "–"
    ratio = m.get("ratio")
    return f"{ratio:.3f}×, {m['loss']:.3f}" if isinstance(ratio, (int, float)) else f"not timed, {m['loss']:.3f}"


def latency_model(a: Artifacts, plots: Plots) -> Section:
    s = Section("latency-model", "Latency model", intro="Error on measured sub-networks the model was not fitted on, "
                "beside the profile's test-retest noise floor: an error at the floor means the machine is the limit, "
                "far above it the model is wrong. The naive sum of per-layer times is the baseline it must beat.")
    if a.preds is None:
        s.missing = f"`{_cmd(a, 'latency_model')}` fits it and reports its held-out error"
        return s
    t = Table(["regime", "held-out error %", "max error %", "Spearman", "noise floor %", "naive-sum error %",
               "held out", "form"])
    verdicts = []
    for regime in sorted(a.preds["regime"].astype(str).unique()):
        m = a.heldout(regime)
        t.rows.append([regime, pct(m["mape_pct"]), pct(m["max_ape_pct"]), frac(m["spearman"]),
                       pct(m["noise_floor_pct"]), pct(m["naive_mape_pct"]), count(m["n"]), str(m["form"])])
        verdicts.append(f"Verdict, {regime}: {m['verdict']}.")
    s.add(t, *verdicts)
    for regime in sorted(a.preds["regime"].astype(str).unique()):
        s.add(plots.predicted_vs_measured(regime))
    return s


def quality_model(a: Artifacts) -> Section:
    s = Section("quality-model", "Quality model", intro="Per-layer loss deltas (each MLP width, head count and the "
                "layer skipped, one layer changed at a time, on calibration text) predict any sub-network's loss; the "
                "search seeds each budget with the knapsack's best configs under it. Scored by rank correlation with "
                "real validation losses of sampled configs it was not fitted on.")
    if not a.quality:
        s.missing = f"`{_cmd(a, 'quality')}` measures the table and scores the model"
        return s
    t = Table(["weights", "held-out Spearman", "90% interval", "additive alone", "mean abs error (nats)", "held out",
               "fitted on", "form", "table s"])
    for weights, rec, _ in a.quality:
        m = rec.get("metrics", {})
        h = m.get("heldout", {})
        ci = h.get("spearman_ci90") or [None, None]
        t.rows.append([weights_label(weights), frac(h.get("spearman")),
                       Cell("–" if None in ci else f"{frac(ci[0]).text}–{frac(ci[1]).text}", num=True),
                       frac(h.get("spearman_additive")),
                       num(h.get("mae_loss"), 3), count(h.get("n")), count(m.get("fit_configs")), str(m.get("form")),
                       num(m.get("table_seconds"), 0)])
    s.add(t)
    for weights, rec, _ in a.quality:
        m = rec.get("metrics", {})
        path = m.get("depth_path") or {}
        if path.get("layers"):
            losses = ", ".join(f"{l} (+{v:.3f})" for l, v in zip(path["layers"], path.get("loss", [])))
            s.add(f"Depth path ({weights_label(weights)}): the layers skipped together at the least loss, in the "
                  f"order a greedy walk removed them, with the loss increase (nats) of skipping each prefix: "
                  f"{losses}; {num(path.get('seconds'), 0)} s.")
        ranking = m.get("layer_ranking") or []
        if ranking:
            s.add(f"Layers in the order `depth:K` skips them ({weights_label(weights)}): "
                  f"{', '.join(map(str, ranking))}.")
    return s


def layers(a: Artifacts, plots: Plots) -> Section:
    s = Section("layers", "Per-layer latency", intro="What each width costs, layer by layer: the table the latency "
                "model and the routers are built on.")
    for regime in a.profile.regimes:
        s.add(plots.heatmap(regime))
    if not s.blocks:
        s.missing = f"`{_cmd(a, 'profile')}` measures every layer width"
    return s


def search(a: Artifacts, plots: Plots) -> Section:
    s = Section("search", "Search", intro="Optuna search per budget, seeded with the quality model's knapsack picks. "
                "A proposal the latency model predicts over budget is never evaluated: it is repaired (the cheapest "
                "cuts in predicted loss per ms) and the repaired config is evaluated as a trial of its own.")
    if not a.searches:
        s.missing = f"`{_cmd(a, 'search')}` searches for the best sub-network under each budget"
        return s
    t = Table(["regime", "weights", "distinct configs evaluated", "evaluated trials",
               "rejected as infeasible (not evaluated)"])
    for regime, weights, trials, _ in a.searches:
        ev = trials[trials["evaluated"].astype(bool)]
        distinct = ev["config"].nunique() if "config" in ev.columns else len(ev)
        t.rows.append([regime, weights, count(distinct), count(len(ev)),
                       count(int((~trials["evaluated"].astype(bool)).sum()))])
    s.add(t)
    for regime, weights, trials, _ in a.searches:
        s.add(plots.search_progress(regime, weights, trials))
    return s


def training(a: Artifacts, plots: Plots) -> Section:
    s = Section("training", "Training", intro="Elastic continued training: each step trains the full model, the "
                "smallest sub-network and sampled ones on the same tokens, distilled from the frozen original.")
    df = a.training
    if df is None or df.empty:
        s.missing = (f"`{_cmd(a, 'train')}` (elastic continued training); then search, verify and export with "
                     "`--weights trained`")
        if a.trained:
            s.missing = f"RUN/trained/ exists but RUN/train/metrics.csv does not; `{_cmd(a, 'train')} --restart`"
        return s
    last = df.iloc[-1]
    facts = [f"{int(last['step'])} steps"]
    if "tokens" in df.columns:
        facts.append(f"{int(last['tokens']):,} tokens")
    if "seconds" in df.columns and math.isfinite(float(last["seconds"])):
        facts.append(f"{float(last['seconds']):.0f} s")
    for k in ("batch_size", "seq_len", "lr", "distill_weight"):
        if k in a.train_config:
            facts.append(f"{k.replace('_', ' ')} {a.train_config[k]}")
    t = Table(["sub-network", "loss at step 1", f"loss at step {int(last['step'])}", "change %"])
    for col, label in (("loss_full", "full model"), ("loss_smallest", "smallest"), ("loss_random", "random sample")):
        if col in df.columns and df[col].notna().any():
            first, end = float(df[col].dropna().iloc[0]), float(df[col].dropna().iloc[-1])
            t.rows.append([label, frac(first), frac(end), pct(100 * (end - first) / first if first else None)])
    return s.add(", ".join(facts) + ".", t, plots.training_curve(df))


def energy(a: Artifacts, plots: Plots) -> Section:
    s = Section("energy", "Energy", intro="Energy per generated or processed token from the GPU's NVML energy "
                "counter, over at least half a second of repeated steps, for the uniform-width sub-networks.")
    col = "energy_mj_per_token"
    rows = a.e2e[(a.e2e["status"] == "ok") & a.e2e[col].notna()] if col in a.e2e.columns else a.e2e.iloc[:0]
    if rows.empty:
        s.missing = (f"not measured on {a.device}: `flextron profile --run {a.run} --device cuda` records energy per "
                     "token where NVML exposes the GPU's energy counter (not on a CPU or under llama.cpp)")
        return s
    for regime, g in rows.groupby("regime"):
        g = g.sort_values("latency_ms_median")
        full = a.full_ms(str(regime))
        t = Table(["sub-network", "measured ms", "× full", "energy mJ/token", "tokens per J"],
                  caption=f"{regime}", collapsed=len(g) > 10)
        for r in g.itertuples():
            e = float(getattr(r, col))
            t.rows.append([describe(_json_config(r.config), a.spec), ms(r.latency_ms_median),
                           frac(r.latency_ms_median / full if full else None), ms(e), ms(1000 / e if e > 0 else None)])
        s.add(plots.energy(str(regime), g), t)
    return s


def _refined(r) -> Cell:
    """What the profile's end-to-end set added toward its target ratio noise floor, and why it stopped."""
    if not isinstance(r, dict) or not isinstance(r.get("rounds_added"), int):
        return Cell("–", num=True)
    from profiler.rounds import REFINE_STOPS

    why = REFINE_STOPS.get(r.get("stop"), str(r.get("stop")))
    return Cell(f"{r['rounds_added']} for {r.get('configs_refined')} configs (target "
                f"{r.get('target_floor_pct')}%, from {r.get('floor_before_pct')}%; {why})", num=True)


def measurement(a: Artifacts, plots: Plots) -> Section:
    s = Section("measurement", "Measurement quality: noise, drift, throttling", intro="Test-retest noise of each "
                "stage's own measurements (two halves of its interleaved rounds); drift of the anchor cell the "
                "profile re-measures through its sweep; cells measured while the GPU's clocks were throttled.")
    t = Table(["stage", "regime", "noise floor % (medians)", "noise floor % (ratio to full)", "rounds",
               "CPU steal % (median / max)", "other processes' CPU % (median / max)", "rounds re-measured",
               "rounds added toward the target floor"],
              caption="Noise floors, and what else took the CPU while the rounds ran (/proc/stat)")
    notes = set()
    for stage, noise in a.noise.items():
        for regime, n in sorted(noise.items()):
            if isinstance(n, dict):
                i = n.get("interference") if isinstance(n.get("interference"), dict) else {}
                if i.get("note"):
                    notes.add(str(i["note"]))

                def pair(k, i=i):
                    lo, hi = i.get(f"{k}_median"), i.get(f"{k}_max")
                    return Cell(f"{lo:.1f} / {hi:.1f}", num=True) if isinstance(lo, (int, float)) and \
                        isinstance(hi, (int, float)) else Cell("–", num=True)

                t.rows.append([stage, regime, pct(n.get("noise_floor_pct")), pct(n.get("ratio_noise_floor_pct")),
                               count(n.get("rounds")), pair("steal_pct"), pair("other_pct"),
                               count(i.get("remeasured_rounds")), _refined(n.get("refine"))])
    s.add(t if t.rows else None)
    for note in sorted(notes):
        s.add(note + "; the rounds were measured without it.")
    L = a.layers
    nvml = any(c in L.columns and L[c].notna().any() for c in ("sm_clock_mhz", "temp_c", "power_w"))
    d = Table(["regime", "anchor re-measurements", "anchor spread (CV) %", "largest drift %"]
              + (["throttled cells", "SM clock MHz", "GPU temperature max °C"] if nvml else []),
              caption="Drift" + (" and throttling" if nvml else "") + " (profile)")
    unanchored = []
    for regime in a.profile.regimes:
        g = L[(L["regime"] == regime) & (L["status"] == "ok")]
        anc = g[g["anchor"].astype(bool)]["latency_ms_median"]
        if len(anc) < 2 and not nvml:
            unanchored.append(regime)
            continue
        cv = 100 * float(anc.std() / anc.mean()) if len(anc) > 1 else None
        drift = 100 * float((anc / anc.median() - 1).abs().max()) if len(anc) > 1 else None
        row = [regime, count(len(anc)), pct(cv), pct(drift)]
        if nvml:
            th = g["throttled"].fillna(False).astype(bool) if "throttled" in g.columns else None
            clocks = g["sm_clock_mhz"].dropna() if "sm_clock_mhz" in g.columns else []
            temp = g["temp_c"].dropna() if "temp_c" in g.columns else []
            row += [Cell(f"{int(th.sum())} of {len(g)}" if th is not None else "–", num=True),
                    Cell(f"{clocks.min():.0f}–{clocks.max():.0f}" if len(clocks) else "–", num=True),
                    count(temp.max() if len(temp) else None)]
        d.rows.append(row)
    s.add(d if d.rows else None)
    if unanchored:
        s.add(f"The profile re-measured no anchor cell in {', '.join(unanchored)}, so the layer cells' drift is "
              "unknown there; the end-to-end set's interleaved rounds still cancel drift in its ratios to the full "
              "model (noise floors above).")
    if not nvml:
        engine = ENGINE_LABEL.get(a.profile.engine, a.profile.engine)
        s.add(f"Clocks, temperature and throttle state are recorded on CUDA GPUs through NVML; this profile ran on "
              f"{a.profile.device.get('device', a.device)} under {engine}, so throttling is not shown.")
    for regime in a.profile.regimes:
        s.add(plots.drift(regime))
    return s


def build_page(a: Artifacts, plots: Plots) -> Page:
    title, facts = about(a)
    sections = [headline(a), lookup(a), verify(a), pareto(a, plots), routers(a, plots), latency_model(a, plots),
                quality_model(a), layers(a, plots), search(a, plots), training(a, plots), energy(a, plots),
                measurement(a, plots)]
    return Page(title, facts, sections)

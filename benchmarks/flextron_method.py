"""The method, measured: elastic continued training, the frontier against one-shot slicing, the
static router against the Optuna search, and dynamic routing against static configs at measured
latency. Prints numbers, tokens used, wall time and the device.

    python benchmarks/flextron_method.py --from-run runs/demo          # reuse a run's convert + profile + fit
    python benchmarks/flextron_method.py --model smollm2-135m --regime decode:b1:ctx256 --train-steps 60

Quality is validation perplexity on at least 16k tokens (never the train or calibration split the
routers were calibrated and selected on). Latency: uniform configs from the profile's interleaved
rounds; every routed and searched config in one more interleaved session beside the full model, in
the routers' regime, inputs real validation tokens (`search/route_select.py`, the code the route
stage chooses with, run here on held-out text).
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from flextron.data import token_windows
from flextron.dynamic_router import DynamicRouting
from flextron.elastic import ElasticModel
from flextron.progress import progress
from flextron.router_store import Routers, load_tensors, regime_dir
from flextron.rundir import RunDir
from flextron.spec import Regime, SubnetConfig
from flextron.train import TrainConfig, train
from profiler.latency_model import LatencyModels
from profiler.profile import Profile
from profiler.telemetry import Telemetry
from search.optuna_search import SearchConfig, results_dir, search
from search.quality import QUALITY_CACHE, QualityEvaluator
from search.route import RouteConfig, latency_table, route
from search.route_select import select_serving


def frontier(prof: Profile, regime: str, ev: QualityEvaluator, max_frac: float) -> list[dict]:
    """Uniform configs measured at or below `max_frac` of the full model (and the full model), with
    their measured ratio and validation ppl."""
    u = prof.uniform(regime)
    u = u[(u.ratio_to_full <= max_frac) | (u.ratio_to_full >= 0.999)]
    cfgs = [SubnetConfig.from_json(c) for c in u.config]
    return [{"config": c, "ratio": float(r), "ppl": math.exp(ev.loss(c))} for c, r in zip(cfgs, u.ratio_to_full)]


def best_under(rows: list[dict], frac: float, ppl: str = "ppl") -> float:
    """The best ppl among rows measured at or below `frac` of the full model (nan when none is)."""
    ok = [r[ppl] for r in rows if r["ratio"] <= frac]
    return min(ok) if ok else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-run", default="", help="copy convert/profile/fit outputs from this run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--regime", default="decode:b1:ctx256")
    ap.add_argument("--out", default="runs/bench-method")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--random-configs", type=int, default=2)
    ap.add_argument("--teacher-data", default="", help="a `flextron synth` set to mix into training")
    ap.add_argument("--teacher-mix", type=float, default=0.0)
    ap.add_argument("--dynamic-steps", type=int, default=20)
    ap.add_argument("--surrogate-samples", type=int, default=80)
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--search-trials", type=int, default=12)
    ap.add_argument("--val-windows", type=int, default=64, help="validation windows (x --val-seq-len tokens)")
    ap.add_argument("--val-seq-len", type=int, default=256)
    ap.add_argument("--timing-rounds", type=int, default=5, help="interleaved rounds, the full model in each")
    ap.add_argument("--timing-reps", type=int, default=5)
    ap.add_argument("--reuse-routers", action="store_true", help="keep the routers (and verdicts) already in OUT")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    t_start = time.perf_counter()  # scoring and training use torch's threads; timing pins one (route_select)
    out = Path(args.out)
    run = RunDir(out)
    if args.from_run and not (out / "elastic").is_dir():
        for stage in ("elastic", "profile", "latency_model"):
            shutil.copytree(Path(args.from_run) / stage, out / stage)
        for f in ("convert_config.json",):
            if (Path(args.from_run) / f).is_file():
                shutil.copy(Path(args.from_run) / f, out / f)
    elif not (out / "elastic").is_dir():
        from flextron.convert import ConvertConfig, convert
        from profiler.fit import FitConfig, fit
        from profiler.sweep import ProfileConfig, profile

        convert(ConvertConfig(model=args.model, out=str(out)))
        profile(ProfileConfig(run=str(out), device=args.device, regime=(args.regime,)))
        fit(FitConfig(run=str(out)))
    models = LatencyModels.load(out)
    regime = models.resolve(args.regime)
    prof = Profile.load(out)
    one_shot = ElasticModel.load(run.elastic, device=args.device)
    spec = one_shot.spec
    full_ms = prof.full_ms(regime, spec)
    corpus = run.corpus("")
    cache = out / "search" / QUALITY_CACHE
    val = dict(windows=args.val_windows, seq_len=args.val_seq_len, corpus=corpus)
    max_frac = max(args.fracs) + 0.02
    ev0 = QualityEvaluator(one_shot, cache, tag="elastic", **val)
    front0 = frontier(prof, regime, ev0, max_frac)
    del one_shot, ev0

    t0 = time.perf_counter()
    tr = train(TrainConfig(run=str(out), steps=args.train_steps, batch_size=args.train_batch,
                           random_configs=args.random_configs, lr=args.lr, device=args.device,
                           **({"teacher_data": args.teacher_data, "teacher_mix": args.teacher_mix}
                              if args.teacher_mix else {})))
    t_train = time.perf_counter() - t0
    trained = ElasticModel.load(out / "trained", device=args.device)
    ev = QualityEvaluator(trained, cache, tag=run.weights_tag("trained"), **val)
    front1 = frontier(prof, regime, ev, max_frac)
    val_tokens = args.val_windows * (args.val_seq_len - 1)

    t0 = time.perf_counter()
    s = search(SearchConfig(run=str(out), regime=regime, budget_frac=tuple(args.fracs), trials=args.search_trials,
                            device=args.device, skip_infeasible=True, weights="trained"))
    best = json.loads((results_dir(out, regime, "trained") / "best.json").read_text())["best"]
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta_path = regime_dir(out, regime, weights="trained") / "router.json"
    if args.reuse_routers and meta_path.is_file() and "selection" in json.loads(meta_path.read_text()):
        meta = json.loads(meta_path.read_text())  # routers this script trained before, with their verdicts
        r = {"table_source": meta["table"]["source"],
             "surrogate_heldout_rel_err": meta["surrogate"]["heldout_mean_rel_err"]}
    else:
        r = route(RouteConfig(run=str(out), regime=regime, weights="trained", device=args.device,
                              dynamic_steps=args.dynamic_steps, surrogate_samples=args.surrogate_samples))
    t_route = time.perf_counter() - t0
    routers = Routers.load(out, regime, spec, weights="trained")
    predict = models.get(regime).predict_config
    reference_ms = routers.meta["reference_full_ms"]

    # held out: every calibrated point's dynamic routing against the static configs (static router,
    # search picks, uniform frontier) on validation text, timed in one interleaved session
    points = sorted(routers.meta["dynamic_calibration"], key=lambda c: c["router_frac"])
    search_cfgs = {f: SubnetConfig.from_dict(b["config"]) for f in args.fracs for b in best
                   if abs(b["budget_frac"] - f) < 1e-6}
    router_cfgs = {f: routers.config_for(f * reference_ms, predict) for f in args.fracs}
    grid_cfgs = [SubnetConfig.from_dict(a["config"]) for a in routers.meta["static_answers"]]
    served_cfgs = [SubnetConfig.from_dict(p["selection"]["static"]["config"]) for p in points
                   if p["selection"].get("static")]  # what the route stage serves, compared with the rest
    statics = list({c.key: c for c in [*grid_cfgs, *search_cfgs.values(), *router_cfgs.values(), *served_cfgs,
                                        *(x["config"] for x in front1)]}.values())
    routing = DynamicRouting(trained)
    routing.load_state_dict(load_tensors(regime_dir(out, regime, weights="trained") / "dynamic_router.safetensors"))
    windows = token_windows(trained.tokenizer, trained.adapter, "validation", args.val_seq_len, args.val_windows,
                            corpus)
    t0 = time.perf_counter()
    held, summary = select_serving(trained, routing, points, statics, windows, latency_table(out, regime, spec),
                                   Regime.parse(regime), args.device, rounds=args.timing_rounds,
                                   reps=args.timing_reps, warmup=2, seed=1, progress=progress)
    t_held = time.perf_counter() - t0
    measured = {SubnetConfig.from_dict(x["config"]).key: x for x in summary["statics"]}
    static_rows = [{"ratio": x["ratio"], "ppl": math.exp(x["loss"])} for x in summary["statics"]]

    device = Telemetry(args.device).device_name
    wall = time.perf_counter() - t_start
    print(f"device: {device}  torch {torch.__version__}  scoring threads {torch.get_num_threads()}, timing threads "
          f"{summary['threads']}  model {spec.family} "
          f"{spec.num_layers} layers  regime {regime}")
    print(f"training: {tr['steps']} steps, {tr['tokens']} train tokens, {tr['seconds']:.0f} s of training "
          f"({t_train:.0f} s in this call)"
          + (f" (teacher data {args.teacher_data} at {args.teacher_mix:.0%})" if args.teacher_mix else ""))
    print(f"search {t_search:.0f} s ({s['quality_evaluations']} evaluations); routers {t_route:.0f} s "
          f"(table: {r['table_source']}; surrogate held-out rel. error {r['surrogate_heldout_rel_err']:.4f}); "
          f"held-out comparison {t_held:.0f} s; total wall {wall:.0f} s")
    print(f"validation: {val_tokens} tokens ({args.val_windows} x {args.val_seq_len}); timing: "
          f"{summary['rounds']} interleaved rounds x {summary['reps']} reps, full model {summary['full_ms']:.2f} ms, "
          f"ratio noise floor {summary['noise']['ratio_noise_floor_pct']:.2f}%")
    print(f"\nfrontier (uniform configs; ratio from the profile's interleaved rounds; full model {full_ms:.2f} ms)")
    print(f"{'x full':>7s} {'one-shot ppl':>13s} {'trained ppl':>12s}")
    by0 = {x["config"].key: x for x in front0}
    for x in sorted(front1, key=lambda x: x["ratio"]):
        print(f"{x['ratio']:7.3f} {by0[x['config'].key]['ppl']:13.2f} {x['ppl']:12.2f}")
    full_ppl = next(x["ppl"] for x in front1 if x["config"] == spec.full())
    print(f"\nbest uniform config within a fraction of the full model's latency (x the trained full model's "
          f"ppl {full_ppl:.2f})")
    headline = {}
    for f in args.fracs:
        a, b_ = best_under(front0, f), best_under(front1, f)
        headline[f] = b_
        print(f"  <= {f:.2f}x: one-shot {a:9.2f} ({a / full_ppl:6.2f}x)   trained {b_:9.2f} ({b_ / full_ppl:6.2f}x)")
    print("\nstatic router against the search at each budget (trained weights; ppl on validation; ratio measured)")
    print(f"{'frac':>5s} {'search ppl':>10s} {'search x':>8s} {'static ppl':>10s} {'static x':>8s}")
    rows = []
    for f in args.fracs:
        sc, rc = search_cfgs.get(f), router_cfgs[f]
        sm = measured.get(sc.key) if sc else None
        rm = measured[rc.key]
        row = {"frac": f, "search_ppl": math.exp(sm["loss"]) if sm else float("nan"),
               "search_ratio": sm["ratio"] if sm else float("nan"), "static_ppl": math.exp(rm["loss"]),
               "static_ratio": rm["ratio"]}
        rows.append(row)
        print(f"{f:5.2f} {row['search_ppl']:10.2f} {row['search_ratio']:8.3f} {row['static_ppl']:10.2f} "
              f"{row['static_ratio']:8.3f}")
    print("\nper calibrated budget, on validation text: each dynamic point's ppl and measured ratio, the best "
          "static config measured at or below that ratio; then what the route stage serves at that budget (chosen "
          "on calibration text) against the best static config and the best of anything measured within it here")
    print(f"{'budget':>6s} {'dyn ppl':>8s} {'dyn x':>6s} {'static@x':>8s} {'serves':>8s} {'served':>8s} "
          f"{'static<=b':>9s} {'any<=b':>8s} {'never worse':>11s}")
    dyn_rows = []
    dyn_val = {d["point"]["router_frac"]: d for d in summary["dynamics"]}
    for p, d in zip(points, summary["dynamics"]):
        dppl, dx = math.exp(d["loss"]), d["ratio"]
        rival = best_under(static_rows, dx) if dx is not None else float("nan")
        t = p["router_frac"]
        within = best_under(static_rows, t)
        anything = min(within, best_under([{"ratio": x["ratio"], "ppl": math.exp(x["loss"])}
                                           for x in summary["dynamics"] if x["ratio"] is not None], t))
        if p["serve"] == "dynamic":
            served = math.exp(dyn_val[p["selection"]["dynamic"]["point"]["router_frac"]]["loss"])
        else:
            served = math.exp(measured[SubnetConfig.from_dict(p["selection"]["static"]["config"]).key]["loss"])
        ok = served <= within * (1 + 1e-3) if within == within else True
        dyn_rows.append({"budget_frac": t, "dynamic_ppl": dppl, "dynamic_ratio": dx, "static_ppl_at_ratio": rival,
                         "serves": p["serve"], "served_ppl": served, "static_ppl_within_budget": within,
                         "best_ppl_within_budget": anything, "never_worse": ok})
        print(f"{t:6.3f} {dppl:8.2f} {dx if dx is not None else float('nan'):6.3f} {rival:8.2f} "
              f"{p['serve']:>8s} {served:8.2f} {within:9.2f} {anything:8.2f} {'yes' if ok else 'NO':>11s}")
    print(json.dumps({
        "device": device, "regime": regime, "train_tokens": tr["tokens"], "train_s": round(t_train),
        "wall_s": round(wall), "validation_tokens": val_tokens, "full_ppl": round(full_ppl, 3),
        "best_uniform_trained": {str(f): round(v, 3) for f, v in headline.items()},
        "noise": summary["noise"], "static_vs_search": [{k: round(v, 4) for k, v in x.items()} for x in rows],
        "dynamic": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items()} for x in dyn_rows],
        "route_verdicts": [p["serve"] for p in points], "route_seconds": round(t_route),
        "held_out_seconds": round(t_held), "train_seconds_total": tr["seconds"]}))


if __name__ == "__main__":
    main()

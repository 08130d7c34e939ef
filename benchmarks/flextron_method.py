"""The method, measured: elastic continued training, the frontier against one-shot slicing, the
static router against the Optuna search, and the dynamic router against the static one at measured
latency. Prints numbers, tokens used and the device.

    python benchmarks/flextron_method.py --from-run runs/demo          # reuse a run's convert + profile + fit
    python benchmarks/flextron_method.py --model smollm2-135m --regime decode:b1:ctx256 --train-steps 60

Quality is validation perplexity (never the train or calibration split); latency is measured on this
device (uniform configs: the profile's end-to-end table; routed configs: per-token decode steps over
real validation text).
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flextron.data import token_windows
from flextron.dynamic_router import DynamicRouting, dynamic_eval
from flextron.elastic import ElasticModel
from flextron.router_store import Routers, load_tensors, regime_dir
from flextron.rundir import RunDir
from flextron.spec import SubnetConfig
from flextron.train import TrainConfig, train
from profiler.latency_model import LatencyModels
from profiler.profile import Profile
from profiler.telemetry import Telemetry
from search.optuna_search import SearchConfig, results_dir, search
from search.quality import QUALITY_CACHE, QualityEvaluator
from search.route import RouteConfig, latency_table, route


@torch.no_grad()
def decode_ms(elastic, window: torch.Tensor, ctx: int, steps: int, cfg: SubnetConfig) -> float:
    """Median ms of one decode step (batch 1, KV cache of `ctx` real tokens), teacher-forced over `steps`
    real tokens."""
    from transformers import DynamicCache

    times = []
    sync = torch.cuda.synchronize if elastic.device.type == "cuda" else (lambda: None)
    with elastic.use(cfg):
        cache = DynamicCache(config=elastic.model.config)
        window = window.to(elastic.device)
        elastic(input_ids=window[None, :ctx], past_key_values=cache, use_cache=True)
        for i in range(ctx, ctx + steps):
            sync()
            t0 = time.perf_counter()
            elastic(input_ids=window[None, i : i + 1], past_key_values=cache, use_cache=True)
            sync()  # on a GPU the step has finished, not just been launched
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def frontier(prof: Profile, regime: str, ev: QualityEvaluator) -> pd.DataFrame:
    u = prof.uniform(regime)
    u["ppl"] = [math.exp(ev.loss(SubnetConfig.from_json(c))) for c in u.config]
    return u[["config", "latency_ms_median", "ppl"]]


def best_under(front: pd.DataFrame, ms: float) -> float:
    """The best ppl among configs measured at or below `ms` (nan when none is)."""
    ok = front[front.latency_ms_median <= ms]
    return float(ok.ppl.min()) if len(ok) else float("nan")


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
    ap.add_argument("--dynamic-steps", type=int, default=20)
    ap.add_argument("--joint-steps", type=int, default=4)
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    ap.add_argument("--search-trials", type=int, default=12)
    ap.add_argument(
        "--timing-rounds", type=int, default=3, help="interleaved rounds of static and dynamic decode timing (median)"
    )
    ap.add_argument(
        "--reuse-routers", action="store_true", help="measure the routers already in OUT instead of retraining them"
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    run = RunDir(out)
    if args.from_run and not (out / "elastic").is_dir():
        for stage in ("elastic", "profile", "latency_model"):
            shutil.copytree(Path(args.from_run) / stage, out / stage)
    elif not (out / "elastic").is_dir():
        from flextron.convert import ConvertConfig, convert
        from profiler.latency_model import FitConfig, fit
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
    cache = out / "search" / QUALITY_CACHE
    front0 = frontier(prof, regime, QualityEvaluator(one_shot, cache, tag="elastic"))

    t0 = time.perf_counter()
    tr = train(
        TrainConfig(
            run=str(out),
            steps=args.train_steps,
            batch_size=args.train_batch,
            random_configs=args.random_configs,
            lr=args.lr,
            device=args.device,
        )
    )
    t_train = time.perf_counter() - t0
    trained = ElasticModel.load(out / "trained", device=args.device)
    ev = QualityEvaluator(trained, cache, tag="trained")
    front1 = frontier(prof, regime, ev)

    budgets = [round(f * full_ms, 4) for f in args.fracs]
    s = search(
        SearchConfig(
            run=str(out),
            regime=regime,
            budget_ms=tuple(budgets),
            trials=args.search_trials,
            device=args.device,
            skip_infeasible=True,
            weights="trained",
        )
    )
    best = json.loads((results_dir(out, regime, "trained") / "best.json").read_text())["best"]
    t1 = time.perf_counter()
    if args.reuse_routers and (regime_dir(out, regime, weights="trained") / "router.json").is_file():
        meta = json.loads((regime_dir(out, regime, weights="trained") / "router.json").read_text())
        r = {
            "table_source": meta["table"]["source"],
            "surrogate_heldout_rel_err": round(meta["surrogate"]["heldout_mean_rel_err"], 4),
        }
    else:
        r = route(
            RouteConfig(
                run=str(out),
                regime=regime,
                weights="trained",
                device=args.device,
                dynamic_steps=args.dynamic_steps,
                joint_steps=args.joint_steps,
            )
        )
    t_route = time.perf_counter() - t1
    routers = Routers.load(out, regime, spec, weights="trained")
    lat = models.get(regime)

    predict = lat.predict_config
    # measured decode steps over real validation text: static-router, search and dynamic-router configs
    val = token_windows(trained.tokenizer, trained.adapter, "validation", 320, 1)[0]
    ctx = min(256, len(val) - 40)
    table = latency_table(out, regime, spec)
    routing = DynamicRouting(trained)
    routing.load_state_dict(load_tensors(regime_dir(out, regime, weights="trained") / "dynamic_router.safetensors"))
    windows = token_windows(trained.tokenizer, trained.adapter, "validation", 128, 8)
    full_step = decode_ms(trained, val, ctx, 32, spec.full())
    # the static router's curve of (measured step, ppl) over its budget grid: dynamic routing is compared
    # with its best config measured at or below the dynamic router's *measured* latency.
    # Static and dynamic steps are timed interleaved, over several rounds (median), so drift of this
    # machine's speed during the run falls on both alike.
    t_min = routers.meta["table"]["smallest_frac"]
    static_cfgs = [routers.config_for(float(t) * predict(spec.full()), predict) for t in np.linspace(t_min, 1.0, 9)]
    static_ll = [ev.loss(c) for c in static_cfgs]
    points = sorted(routers.meta["dynamic_calibration"], key=lambda c: c["router_frac"])
    routing.install()
    try:  # quality of each calibrated point under hard per-token routing
        evals = [
            dynamic_eval(trained, routing, windows, tuple(pt["heads"]), pt["router_frac"], table, shift=pt["shift"])
            for pt in points
        ]
    finally:
        routing.remove()
    t_static, t_dyn = [[] for _ in static_cfgs], [[] for _ in points]
    for _ in range(args.timing_rounds):
        for i in range(max(len(static_cfgs), len(points))):
            if i < len(static_cfgs):
                t_static[i].append(decode_ms(trained, val, ctx, 32, static_cfgs[i]))
            if i < len(points):
                routing.install()
                try:
                    routing.set(points[i]["router_frac"], soft=False, shift=points[i]["shift"])
                    t_dyn[i].append(
                        decode_ms(trained, val, ctx, 32, SubnetConfig(spec.full().mlp_width, tuple(points[i]["heads"])))
                    )
                finally:
                    routing.remove()
    static_curve = sorted((float(np.median(ts)), ll) for ts, ll in zip(t_static, static_ll))
    static_front = pd.DataFrame(
        {"latency_ms_median": [m for m, _ in static_curve], "ppl": [math.exp(ll) for _, ll in static_curve]}
    )
    rows = []
    for b, f in zip(budgets, args.fracs):
        sb = next((x for x in best if abs(x["budget_ms"] - b) < 1e-6), None)
        rc = routers.config_for(b, predict)
        rows.append(
            {
                "frac": f,
                "budget_ms": b,
                "router_ppl": math.exp(ev.loss(rc)),
                "router_pred_ms": predict(rc),
                "search_ppl": math.exp(sb["loss"]) if sb else float("nan"),
                "search_source": sb["source"] if sb else "",
                "static_step_ms": decode_ms(trained, val, ctx, 32, rc),
            }
        )
    # the dynamic router at each calibrated budget (its heads, logit shift and budget input), measured
    dyn_rows = []
    for pt, d, ts in zip(points, evals, t_dyn):
        dyn_ms = float(np.median(ts))
        dyn_rows.append(
            {
                "budget_frac": pt["router_frac"],
                "shift": pt["shift"],
                "dynamic_ppl": math.exp(d["loss"]),
                "expected_ms": d["expected_frac"] * table.full,
                "measured_ms": dyn_ms,
                "static_ppl_at_measured_ms": best_under(static_front, dyn_ms),
            }
        )
    device = Telemetry(args.device).device_name
    print(f"device: {device}  torch {torch.__version__}  model {spec.family} {spec.num_layers} layers  regime {regime}")
    print(
        f"training: {tr['steps']} steps, {tr['tokens']} train tokens, {t_train:.0f} s; routers {t_route:.0f} s "
        f"(table: {r['table_source']}); surrogate held-out mean relative error {r['surrogate_heldout_rel_err']:.4f}"
    )
    print(f"\nfrontier (uniform configs, measured {regime} latency; ppl on {ev.tokens} validation tokens)")
    print(f"{'latency ms':>10s} {'x full':>7s} {'one-shot ppl':>13s} {'trained ppl':>12s}")
    m = front0.merge(front1, on=["config", "latency_ms_median"], suffixes=("_0", "_1")).sort_values("latency_ms_median")
    for x in m.itertuples():
        print(f"{x.latency_ms_median:10.2f} {x.latency_ms_median / full_ms:7.2f} {x.ppl_0:13.2f} {x.ppl_1:12.2f}")
    full_ppl = float(m.iloc[-1].ppl_1) if len(m) else float("nan")
    print("\nbest uniform config within a fraction of the full model's latency (ppl, and x the trained full model's)")
    for f in args.fracs + [0.5]:
        a, b_ = best_under(front0, f * full_ms), best_under(front1, f * full_ms)
        print(f"  <= {f:.2f}x: one-shot {a:9.2f} ({a / full_ppl:6.2f}x)   trained {b_:9.2f} ({b_ / full_ppl:6.2f}x)")
    print(f"\nstatic router vs search at budgets (trained weights; full decode step {full_step:.2f} ms)")
    print(f"{'frac':>5s} {'budget':>8s} {'search ppl':>10s} {'static ppl':>10s} {'static ms':>9s}")
    for x in rows:
        print(
            f"{x['frac']:5.2f} {x['budget_ms']:8.2f} {x['search_ppl']:10.2f} {x['router_ppl']:10.2f} "
            f"{x['static_step_ms']:9.2f}"
        )
    print(
        "\nstatic router curve (measured decode ms, ppl): "
        + ", ".join(f"({a:.1f}, {math.exp(l):.1f})" for a, l in static_curve)
    )
    print(
        "dynamic router at its calibrated budgets; 'static ppl' is the best static config measured at or "
        "below the dynamic step "
        f"(medians of {args.timing_rounds} interleaved timing rounds)"
    )
    print(
        f"{'frac':>5s} {'shift':>7s} {'dynamic ppl':>11s} {'exp ms':>7s} {'meas ms':>8s} {'static ppl':>10s} "
        f"{'better':>6s}"
    )
    for x in dyn_rows:
        sp = x["static_ppl_at_measured_ms"]
        better = (
            ""
            if sp != sp
            else (
                "yes" if x["dynamic_ppl"] < sp * (1 - 1e-3) else "tie" if x["dynamic_ppl"] <= sp * (1 + 1e-3) else "no"
            )
        )
        print(
            f"{x['budget_frac']:5.2f} {x['shift']:7.2f} {x['dynamic_ppl']:11.2f} {x['expected_ms']:7.2f} "
            f"{x['measured_ms']:8.2f} "
            f"{x['static_ppl_at_measured_ms']:10.2f} {better:>6s}"
        )
    print(
        json.dumps(
            {
                "device": device,
                "regime": regime,
                "train_tokens": tr["tokens"],
                "train_s": round(t_train),
                "surrogate_rel_err": r["surrogate_heldout_rel_err"],
                "search_evaluations": s["quality_evaluations"],
                "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in rows],
                "dynamic": [{k: round(v, 3) for k, v in x.items()} for x in dyn_rows],
            }
        )
    )


if __name__ == "__main__":
    main()

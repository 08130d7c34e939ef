"""Dynamic routing only where it measures better: per calibrated budget, the routed model against the
static router's configs, on this device, in the regime the routers serve.

Quality is the loss on calibration text (never the validation split that `flextron eval` reports);
latency is measured in interleaved rounds with the full model in every round (`InterleavedSession`),
inputs real calibration tokens, because a routed step's cost depends on the tokens. `flextron.serving
.decide` gives the verdict from the two measurements. Where per-token routing cannot run as the
regime deploys (under CUDA graphs, or in llama.cpp, which runs dense sliced exports), every budget is
served static and the record says why.
"""

from __future__ import annotations

import contextlib

import torch

from flextron.devices import set_cpu_threads
from flextron.dynamic_router import dynamic_eval
from flextron.evaluate import mean_loss
from flextron.serving import decide
from flextron.spec import Regime, SubnetConfig

# what serving a dynamic point needs (and its expected latency), kept with each measurement
POINT_FIELDS = ("router_frac", "heads", "shift", "fixed_layers", "expected_frac")


def unroutable(regime: Regime) -> str | None:
    """Why per-token routing cannot be measured as `regime` deploys, or None."""
    if regime.engine == "llamacpp":
        return "llama.cpp serves dense sliced exports: per-token routing does not run in that engine"
    if regime.mode != "eager":
        return f"per-token routing has data-dependent shapes and cannot run under {regime.mode}"
    return None


def routed_setup(routing, point: dict):
    """A context manager factory that installs `routing` at `point`'s budget input, shift and fixed layers."""
    @contextlib.contextmanager
    def setup():
        routing.install()
        routing.set(float(point["router_frac"]), soft=False, shift=float(point["shift"]),
                    fixed=point.get("fixed_layers"))
        try:
            yield
        finally:
            routing.remove()

    return setup


def dynamic_key(point: dict) -> str:
    return f"dynamic@{point['router_frac']:.4f}"


def select_serving(elastic, routing, points: list[dict], static_cfgs: list[SubnetConfig], windows, table,
                   regime: Regime, device: str, *, rounds: int, reps: int, warmup: int, seed: int,
                   threads: int = 0, batch_size: int = 4, progress=None) -> tuple[list[dict], dict]:
    """`points` (calibrated, see `calibrate_dynamic`) each with its verdict at its budget: `serve` and
    `selection` (the best dynamic point and the best static config measured within the budget, the
    reason); and a summary of the measurement (rounds, reps, noise floor, tokens, every static config's
    and every dynamic point's measurement). `static_cfgs` are the static candidates (the static
    router's answers, uniform configs, search picks). `windows` are calibration
    windows: losses are computed on them (at torch's thread count as it is) and the timed inputs are
    their tokens (on a CPU at `threads` intra-op threads, 0 = one, restored after). Leaves the model
    without routing installed, in the regime's dtype."""
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import noise_floor

    statics = {c.key: c for c in static_cfgs}
    static_loss = {k: mean_loss(elastic, c, windows, batch_size) for k, c in statics.items()}
    routing.install()
    try:
        dyn_loss = {dynamic_key(p): dynamic_eval(elastic, routing, windows, p["heads"], p["router_frac"], table,
                                                 batch_size, shift=p["shift"], fixed=p.get("fixed_layers"))["loss"]
                    for p in points}
    finally:
        routing.remove()
    why_not = unroutable(regime)
    subs = dict(statics)
    setups = {}
    if why_not is None:
        for p in points:
            subs[dynamic_key(p)] = SubnetConfig(elastic.spec.full().mlp_width, tuple(p["heads"]))
            setups[dynamic_key(p)] = routed_setup(routing, p)
    before = torch.get_num_threads()
    threads = set_cpu_threads(device, threads)
    try:
        with InterleavedSession(elastic, regime, device, reps, warmup, seed=seed, threads=threads,
                                text=windows.reshape(-1)) as session:
            for m in routing.modules:  # the routers run in the regime's dtype, like the model they sit in
                m.to(device=elastic.device, dtype=next(elastic.model.parameters()).dtype)
            session.run(subs, rounds, progress, setups=setups)
            measured = session.ratios()
            noise = noise_floor(session.samples, FULL)
    finally:
        torch.set_num_threads(before)
    static_rows = [{"config": c.to_dict(), "loss": round(static_loss[k], 5),
                    "ratio": round(measured[session.key_of(k)]["ratio_to_full"], 4),
                    "measured_ms": round(measured[session.key_of(k)]["measured_ms"], 4)} for k, c in statics.items()]
    dynamics = []
    for p in points:
        k = dynamic_key(p)
        ratio = round(measured[k]["ratio_to_full"], 4) if why_not is None else None
        dynamics.append({"loss": round(dyn_loss[k], 5), "ratio": ratio,
                         "measured_ms": round(measured[k]["measured_ms"], 4) if why_not is None else None,
                         "point": {f: p[f] for f in POINT_FIELDS}})
    out = []
    for p in points:
        verdict = decide(p["router_frac"], dynamics, static_rows)
        if why_not is not None:
            verdict["reason"] = why_not
        out.append({**p, "serve": verdict["serve"], "selection": verdict})
    summary = {"regime": regime.key, "rounds": rounds, "reps": reps, "threads": threads,
               "quality_tokens": int(windows[:, 1:].numel()),
               "full_ms": round(measured[FULL]["measured_ms"], 4), "noise": noise,
               "dynamic_unmeasured": why_not, "served_dynamic": sum(p["serve"] == "dynamic" for p in out),
               "statics": static_rows, "dynamics": dynamics}
    return out, summary

"""Serving one budget with a run's routers: dynamic routing, or the static config that measured better.

`flextron route` calibrates the dynamic router at a grid of budgets and then measures every calibrated
point and every static candidate (the static router's answers, the uniform configs, the search's
picks) on the device, interleaved with the full model (`search/route_select.py`). `decide` serves a
budget with dynamic routing only where some calibrated dynamic point measured within the budget with
a lower loss than every static config measured within it; otherwise with the best static config
measured within it. The calibration record holds both measurements and the verdict, and `Served`
attaches that verdict to an `ElasticModel`, so `generate`, evaluation and timing all run what a
deployment runs:

    served = routers.serve(elastic, budget_ms=12.0)   # flextron.router_store.Routers
    with served:
        elastic.model.generate(...)
"""

from __future__ import annotations

from flextron.dynamic_router import DynamicRouting
from flextron.errors import FlextronError
from flextron.spec import SubnetConfig


def decide(budget_frac: float, dynamics: list[dict], statics: list[dict]) -> dict:
    """Dynamic or static at one budget (a fraction of the full model's latency), from measurements
    taken side by side: each of `dynamics` (the calibrated dynamic points, `point` holding its router
    input, shift, heads and fixed layers) and of `statics` (with `config`) holds `loss` (nats, on
    calibration text) and `ratio` (measured latency over the full model's in the same rounds).

    Only what measured within the budget counts, whatever it was calibrated for: dynamic routing
    calibrated for a lower budget may be the one that fits, as routing costs time the latency table
    does not see (a dynamic point must also be expected within it by the latency table). Dynamic is
    served when the best dynamic point within the budget has a lower loss than every static config
    within it (so than every static config at or below its own latency too). Otherwise the best
    static config within the budget is served, or, when none measured within it, the fastest one.
    Returns the verdict (`serve`, `reason`) with the best dynamic point and the best static config
    within the budget (each None when none fits)."""
    if not statics:
        raise FlextronError("deciding between dynamic and static routing needs measured static configs")
    # a dynamic point fits where it measured within the budget and the latency table expects it to
    # (a single noisy measurement never lets a wide routing serve a tight budget)
    fits = [d for d in dynamics if d["ratio"] is not None and d["ratio"] <= budget_frac
            and d["point"].get("expected_frac", 0.0) <= budget_frac + 1e-6]
    dyn = min(fits, key=lambda d: d["loss"], default=None)
    within = [s for s in statics if s["ratio"] <= budget_frac]
    static = min(within, key=lambda s: s["loss"], default=None)
    if dyn is not None and (static is None or dyn["loss"] < static["loss"]):
        versus = (f"below {static['loss']:.4f} of the best static config within it ({static['ratio']:.3f}x)"
                  if static else "no static config measured within the budget")
        verdict = ("dynamic", f"dynamic routing calibrated at {dyn['point']['router_frac']:.3f} measured "
                              f"{dyn['ratio']:.3f}x, within {budget_frac:.3f}x, with loss {dyn['loss']:.4f}, {versus}")
    elif dyn is None:
        verdict = ("static", f"no dynamic routing measured within {budget_frac:.3f}x of the full model")
    else:
        verdict = ("static", f"the best static config within {budget_frac:.3f}x ({static['ratio']:.3f}x) has loss "
                             f"{static['loss']:.4f} <= {dyn['loss']:.4f} of the best dynamic routing within it "
                             f"({dyn['ratio']:.3f}x)")
    if static is None and verdict[0] == "static":  # nothing fits: the fastest static config, said so
        static = min(statics, key=lambda s: s["ratio"])
        verdict = ("static", verdict[1] + f"; no static config measured within it either: the fastest "
                                          f"({static['ratio']:.3f}x)")
    return {"serve": verdict[0], "reason": verdict[1], "dynamic": None if dyn is None else dict(dyn),
            "static": None if static is None else dict(static)}


class Served:
    """One calibrated budget point attached to an `ElasticModel`: dynamic routing (the router installed
    at the budget input, logit shift and fixed layers of the dynamic point its verdict chose, the heads
    static) or the static config its verdict chose. `attach()` / `remove()`, or use it as a context manager;
    the model's previous config comes back on removal."""

    def __init__(self, elastic, point: dict, router_state: dict | None = None):
        if "serve" not in point:
            raise FlextronError("this calibration point has no serving verdict (routers trained by an older flextron); "
                                "re-run `flextron route`")
        self.elastic, self.point, self.mode = elastic, point, point["serve"]
        self.routing: DynamicRouting | None = None
        if self.mode == "dynamic":
            if router_state is None:
                raise FlextronError("serving the dynamic router needs its weights (dynamic_router.safetensors)")
            self.routed = point["selection"]["dynamic"]["point"]  # the calibrated point that fits this budget
            self.config = SubnetConfig(elastic.spec.full().mlp_width, tuple(self.routed["heads"]))
            self._state = router_state
        else:
            self.config = SubnetConfig.from_dict(point["selection"]["static"]["config"])
        elastic.spec.validate(self.config)
        self._prev: SubnetConfig | None = None

    @property
    def budget_frac(self) -> float:
        """The router input this point was calibrated at (a fraction of the latency table's full model)."""
        return float(self.point["router_frac"])

    def attach(self) -> "Served":
        if self._prev is not None:
            raise FlextronError("this budget is already attached; remove() it first")
        self._prev = self.elastic.config
        if self.mode == "dynamic":
            self.routing = DynamicRouting(self.elastic)
            self.routing.load_state_dict(self._state)
            self.routing.install()
            p = self.routed
            self.routing.set(float(p["router_frac"]), soft=False, shift=float(p["shift"]), fixed=p.get("fixed_layers"))
        self.elastic.set_config(self.config)
        return self

    def remove(self) -> None:
        if self._prev is None:
            return
        if self.routing is not None:
            self.routing.remove()
            self.routing = None
        self.elastic.set_config(self._prev)
        self._prev = None

    def __enter__(self) -> "Served":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def describe(self) -> dict:
        """What is served and the measurements that chose it."""
        sel = self.point.get("selection", {})
        routed = self.routed if self.mode == "dynamic" else {}
        return {"serve": self.mode, "router_frac": self.budget_frac, "config": self.config.to_dict(),
                "routed_at": routed.get("router_frac"), "shift": routed.get("shift"),
                "fixed_layers": len(routed.get("fixed_layers") or {}) if routed else None,
                "reason": sel.get("reason")}

"""Serving one budget with a run's routers: dynamic routing, or the static config that measured better.

`flextron route` calibrates the dynamic router at a grid of budgets and then measures, per budget,
the routed model against the static router's configs on the device, interleaved with the full model
(`search/route.py`). `decide` keeps dynamic routing only where it met the budget and measured a lower
loss than the best static config measured at or below its latency; otherwise the budget is served by
the best static config measured within it. The calibration record holds both measurements and the
verdict, and `Served` attaches that verdict to an `ElasticModel`, so `generate`, evaluation and
timing all run what a deployment runs:

    served = routers.serve(elastic, budget_ms=12.0)   # flextron.router_store.Routers
    with served:
        elastic.model.generate(...)
"""

from __future__ import annotations

from flextron.dynamic_router import DynamicRouting
from flextron.errors import FlextronError
from flextron.spec import SubnetConfig


def decide(budget_frac: float, dynamic: dict, statics: list[dict]) -> dict:
    """Dynamic or static at one budget (a fraction of the full model's latency), from measurements
    taken side by side: `dynamic` and each of `statics` hold `loss` (nats, on calibration text) and
    `ratio` (measured latency over the full model's in the same rounds); statics hold `config` too.

    Dynamic is kept when its measured ratio is within the budget and its loss is below that of every
    static config measured at or below its ratio (none measured that fast: nothing to compare, it is
    kept). Otherwise the budget is served by the static config of lowest loss measured within the
    budget, or, when none is, by the fastest static config. Returns the verdict (`serve`, `reason`),
    the static config served or compared against (`static`), and the dynamic measurement."""
    if not statics:
        raise FlextronError("deciding between dynamic and static routing needs measured static configs")
    as_fast = [s for s in statics if s["ratio"] <= dynamic["ratio"]]
    rival = min(as_fast, key=lambda s: s["loss"], default=None)
    within = [s for s in statics if s["ratio"] <= budget_frac]
    fallback = (min(within, key=lambda s: s["loss"]) if within else min(statics, key=lambda s: s["ratio"]))
    if dynamic["ratio"] > budget_frac:
        verdict = ("static", f"dynamic measured {dynamic['ratio']:.3f}x of full, over the budget {budget_frac:.3f}x")
    elif rival is not None and rival["loss"] <= dynamic["loss"]:
        verdict = ("static", f"a static config measured at {rival['ratio']:.3f}x (at or below dynamic's "
                             f"{dynamic['ratio']:.3f}x) has loss {rival['loss']:.4f} <= dynamic's "
                             f"{dynamic['loss']:.4f}")
    elif rival is None:
        verdict = ("dynamic", f"no static config measured as fast as dynamic's {dynamic['ratio']:.3f}x")
    else:
        verdict = ("dynamic", f"loss {dynamic['loss']:.4f} < {rival['loss']:.4f} of the best static config "
                              f"measured at or below dynamic's {dynamic['ratio']:.3f}x")
    static = fallback if verdict[0] == "static" else rival
    return {"serve": verdict[0], "reason": verdict[1], "dynamic": dict(dynamic),
            "static": dict(static) if static is not None else None}


class Served:
    """One calibrated budget point attached to an `ElasticModel`: dynamic routing (the router
    installed at the point's budget input, logit shift and fixed layers, the heads static) or the
    static config its calibration chose. `attach()` / `remove()`, or use it as a context manager;
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
            self.config = SubnetConfig(elastic.spec.full().mlp_width, tuple(point["heads"]))
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
            p = self.point
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
        return {"serve": self.mode, "router_frac": self.budget_frac, "config": self.config.to_dict(),
                "shift": self.point.get("shift") if self.mode == "dynamic" else None,
                "fixed_layers": len(self.point.get("fixed_layers") or {}) if self.mode == "dynamic" else None,
                "reason": sel.get("reason")}

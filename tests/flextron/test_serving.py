"""Serving one budget: the dynamic-vs-static verdict, and attaching it to a model."""

import pytest
import torch

from flextron.errors import FlextronError
from flextron.serving import Served, decide

STATICS = [{"config": {"n": 1}, "loss": 3.0, "ratio": 0.55}, {"config": {"n": 2}, "loss": 2.5, "ratio": 0.70},
           {"config": {"n": 3}, "loss": 2.2, "ratio": 0.85}]


def _dyn(loss, ratio, at):
    return {"loss": loss, "ratio": ratio, "point": {"router_frac": at}}


def test_a_budget_is_served_by_what_measured_best_within_it():
    # dynamic within the budget and better than every static config within it: dynamic
    v = decide(0.75, [_dyn(2.4, 0.72, 0.70), _dyn(2.0, 0.80, 0.75)], STATICS)
    assert v["serve"] == "dynamic" and v["dynamic"]["point"]["router_frac"] == 0.70
    assert v["static"]["config"] == {"n": 2}  # the static config it beat, kept beside it
    # as good a static config within the budget: static
    v = decide(0.75, [_dyn(2.5, 0.72, 0.70)], STATICS)
    assert v["serve"] == "static" and v["static"]["config"] == {"n": 2} and v["dynamic"]["loss"] == 2.5
    # routing calibrated for this budget measured over it: a point calibrated lower that fits may serve it
    v = decide(0.75, [_dyn(2.3, 0.74, 0.65), _dyn(2.0, 0.80, 0.75)], STATICS)
    assert v["serve"] == "dynamic" and v["dynamic"]["point"]["router_frac"] == 0.65
    # no dynamic point fits: static, said so
    v = decide(0.75, [_dyn(2.0, 0.80, 0.75)], STATICS)
    assert v["serve"] == "static" and v["dynamic"] is None and "no dynamic routing measured within" in v["reason"]
    # nothing static fits: a dynamic point that does is served, else the fastest static config
    assert decide(0.5, [_dyn(3.5, 0.45, 0.5)], STATICS)["serve"] == "dynamic"
    v = decide(0.5, [_dyn(3.5, 0.52, 0.5)], STATICS)
    assert v["serve"] == "static" and v["static"]["config"] == {"n": 1} and "the fastest" in v["reason"]
    # an unmeasured dynamic router (ratio None) never serves
    assert decide(0.9, [_dyn(1.0, None, 0.9)], STATICS)["serve"] == "static"
    # nor one the latency table expects over the budget, however fast it happened to measure
    wide = {**_dyn(1.0, 0.6, 1.0), "point": {"router_frac": 1.0, "expected_frac": 1.0}}
    assert decide(0.9, [wide], STATICS)["serve"] == "static"
    with pytest.raises(FlextronError, match="needs measured static configs"):
        decide(0.5, [_dyn(1.0, 0.4, 0.5)], [])


def _point(el, serve: str) -> dict:
    small = el.spec.smallest()
    routed = {"router_frac": 0.55, "heads": list(el.spec.full().heads), "shift": 2.0, "fixed_layers": {"0": 0},
              "expected_frac": 0.54}
    return {"router_frac": 0.6, "heads": list(el.spec.full().heads), "shift": 0.5, "fixed_layers": {},
            "serve": serve, "selection": {"serve": serve, "reason": "test",
                                          "dynamic": {"loss": 0.9, "ratio": 0.58, "point": routed},
                                          "static": {"config": small.to_dict(), "loss": 1.0, "ratio": 0.5}}}


def test_served_dynamic_routing_attaches_generates_and_comes_off(tiny_run):
    from flextron.dynamic_router import DynamicMLP, DynamicRouting
    from flextron.elastic import ElasticModel

    el = ElasticModel.load(tiny_run / "elastic")
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in DynamicRouting(el).state_dict().items()}
    ids = torch.randint(0, el.spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = el(input_ids=ids, use_cache=False).logits
    served = Served(el, _point(el, "dynamic"), state)
    with served:
        mlps = [el.adapter.mlp_of(layer) for layer in el.adapter.layers(el.model)]
        assert all(isinstance(m, DynamicMLP) for m in mlps)
        # the routing of the dynamic point the verdict chose (calibrated at 0.55), not the budget's own
        assert mlps[0].fixed == 0 and mlps[1].fixed is None and mlps[1].shift == 2.0 and mlps[1].budget == 0.55
        assert served.routing.state_dict().keys() == state.keys()
        assert all(torch.equal(served.routing.state_dict()[k], v) for k, v in state.items())
        out = el.model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 10)
        with torch.no_grad():
            routed = el(input_ids=ids, use_cache=False).logits
        with pytest.raises(FlextronError, match="already attached"):
            served.attach()
    assert not torch.allclose(routed, before)
    assert not any(isinstance(el.adapter.mlp_of(layer), DynamicMLP) for layer in el.adapter.layers(el.model))
    with torch.no_grad():
        assert torch.equal(el(input_ids=ids, use_cache=False).logits, before)
    assert served.describe()["serve"] == "dynamic" and served.describe()["fixed_layers"] == 1
    assert served.describe()["routed_at"] == 0.55


def test_served_static_sets_the_config_and_restores_the_previous(tiny_run):
    from flextron.elastic import ElasticModel

    el = ElasticModel.load(tiny_run / "elastic")
    prev = el.spec.uniform(0.5)
    el.set_config(prev)
    with Served(el, _point(el, "static")) as s:
        assert el.config == el.spec.smallest() and s.routing is None
    assert el.config == prev
    with pytest.raises(FlextronError, match="re-run `flextron route`"):
        Served(el, {k: v for k, v in _point(el, "static").items() if k != "serve"})
    with pytest.raises(FlextronError, match="needs its weights"):
        Served(el, _point(el, "dynamic"))

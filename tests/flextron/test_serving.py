"""Serving one budget: the dynamic-vs-static verdict, and attaching it to a model."""

import pytest
import torch

from flextron.errors import FlextronError
from flextron.serving import Served, decide

STATICS = [{"config": {"n": 1}, "loss": 3.0, "ratio": 0.55}, {"config": {"n": 2}, "loss": 2.5, "ratio": 0.70},
           {"config": {"n": 3}, "loss": 2.2, "ratio": 0.85}]


def test_dynamic_is_kept_only_where_it_measured_better_at_equal_latency():
    # within the budget, and better than every static config measured at or below its latency
    v = decide(0.75, {"loss": 2.4, "ratio": 0.72}, STATICS)
    assert v["serve"] == "dynamic" and v["static"]["config"] == {"n": 2}
    # a static config as fast or faster is as good: static, and the best one within the budget
    v = decide(0.75, {"loss": 2.5, "ratio": 0.72}, STATICS)
    assert v["serve"] == "static" and v["static"]["config"] == {"n": 2}
    assert v["dynamic"] == {"loss": 2.5, "ratio": 0.72}
    # better than anything as fast, but measured over the budget: the best static within it
    v = decide(0.75, {"loss": 2.0, "ratio": 0.80}, STATICS)
    assert v["serve"] == "static" and v["static"]["config"] == {"n": 2} and "over the budget" in v["reason"]
    # faster than every static config: nothing to compare, dynamic
    v = decide(0.6, {"loss": 3.5, "ratio": 0.50}, STATICS)
    assert v["serve"] == "dynamic" and v["static"] is None
    # nothing static within the budget either: the fastest static config
    v = decide(0.5, {"loss": 3.5, "ratio": 0.52}, STATICS)
    assert v["serve"] == "static" and v["static"]["config"] == {"n": 1}
    with pytest.raises(FlextronError, match="needs measured static configs"):
        decide(0.5, {"loss": 1.0, "ratio": 0.4}, [])


def _point(el, serve: str) -> dict:
    small = el.spec.smallest()
    return {"router_frac": 0.6, "heads": list(el.spec.full().heads), "shift": 2.0, "fixed_layers": {"0": 0},
            "serve": serve, "selection": {"serve": serve, "reason": "test",
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
        assert mlps[0].fixed == 0 and mlps[1].fixed is None and mlps[1].shift == 2.0 and mlps[1].budget == 0.6
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

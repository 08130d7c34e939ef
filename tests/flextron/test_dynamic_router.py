import random

import pytest
import torch


def test_dynamic_router_grouped_compute_matches_masked_and_skips(tiny_run):
    """Hard routing (tokens grouped by width, prefix weights) equals the nested-mask formulation with
    one-hot choices, and each group multiplies only its prefix."""
    from flextron.dynamic_router import DynamicRouting
    from flextron.elastic import ElasticModel

    el = ElasticModel.load(tiny_run / "elastic")
    routing = DynamicRouting(el)
    m = routing.modules[0]
    torch.manual_seed(0)
    with torch.no_grad():
        m.router.weight.normal_(0, 1.0)
    x = torch.randn(3, 7, el.spec.hidden_size)
    m.soft = False
    hard = m(x)
    choice = m.last_choice
    assert len(choice.unique()) > 1  # several widths really used
    # reference: each token through the MLP sliced to its width
    ref = torch.stack([
        torch.nn.functional.linear(
            m.mlp.act_fn(torch.nn.functional.linear(t, m.gate.weight[: m.widths[c]]))
            * torch.nn.functional.linear(t, m.up.weight[: m.widths[c]]), m.down.weight[:, : m.widths[c]])
        for t, c in zip(x.reshape(-1, x.shape[-1]), choice.reshape(-1))]).view_as(x)
    assert torch.allclose(hard, ref, atol=1e-5)
    # soft path at a tiny temperature is (nearly) the same one-hot choice, as a mask
    m.soft, m.tau = True, 1e-4
    torch.manual_seed(1)
    m(x)
    assert (m.last_probs.argmax(-1) == choice).float().mean() > 0.7


def test_router_training_leaves_the_model_frozen(tiny_run):
    """Router training changes the router only; budgets follow the seed's stream."""
    from flextron.dynamic_router import DynamicRouting, DynamicTrainer
    from flextron.elastic import ElasticModel
    from flextron.latency_table import LatencyTable

    el, teacher = ElasticModel.load(tiny_run / "elastic"), ElasticModel.load(tiny_run / "elastic")
    for p in list(el.model.parameters()) + list(teacher.model.parameters()):
        p.requires_grad_(False)
    table = LatencyTable.analytic(el.spec, "prefill:b1:s16")
    routing = DynamicRouting(el)
    weights = {n: p.detach().clone() for n, p in el.model.named_parameters()}
    routing.install()
    router_before = {k: v.clone() for k, v in routing.state_dict().items()}
    windows = torch.randint(0, el.spec.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    trainer = DynamicTrainer(el, routing, teacher, windows, table, lambda t: el.spec.full().heads, batch_size=2,
                             latency_weight=20.0, seed=3)
    torch.manual_seed(0)
    hist = trainer.train_router(3, lr=1e-2)
    assert any((router_before[k] != v).any() for k, v in routing.state_dict().items())
    assert all(torch.equal(weights[n], p) for n, p in el.model.named_parameters() if n in weights)
    rng = random.Random(3)
    assert [h["budget_frac"] for h in hist] == [round(rng.uniform(table.smallest_frac, 1.0), 4) for _ in range(3)]
    assert [h["step"] for h in hist] == [0, 1, 2]


def test_a_fixed_layer_computes_its_width_without_the_router(tiny_run):
    """A layer fixed at a width runs that prefix for every token without calling the router, and its
    accounting (choice shares, expected latency) is that width's; `constant_layers` finds the layers
    where one width took every token (or the given share)."""
    from flextron.dynamic_router import DynamicRouting, constant_layers
    from flextron.elastic import ElasticModel
    from flextron.latency_table import LatencyTable

    el = ElasticModel.load(tiny_run / "elastic")
    routing = DynamicRouting(el)
    m = routing.modules[0]
    x = torch.randn(2, 5, el.spec.hidden_size)
    routing.set(0.5, soft=False, fixed={"0": 1})
    calls = []
    hook = m.router.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = m(x)
    hook.remove()
    assert calls == []
    assert torch.equal(out, m.prefix(x, m.widths[1]))
    assert m.last_probs.shape == (10, len(m.widths)) and (m.last_probs[:, 1] == 1).all()
    routing.set(0.5, soft=False)  # unfixed again: the router decides
    assert routing.modules[0].fixed is None
    table = LatencyTable.analytic(el.spec, "prefill:b1:s16")
    routing.set(0.5, soft=False, fixed={str(l): 0 for l in range(el.spec.num_layers)})
    routing.install()
    with torch.no_grad():
        el(input_ids=torch.randint(0, el.spec.vocab_size, (1, 8)), use_cache=False)
    routing.remove()
    e = float(routing.expected_frac(table, el.spec.full().heads))
    attn = sum(float(table.attn[l, -1]) for l in range(el.spec.num_layers))
    assert e == pytest.approx((table.fixed + attn + float(table.mlp[:, 0].sum())) / table.full)
    assert constant_layers([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.02, 0.0, 0.98]], 1.0) == {0: 1}
    assert constant_layers([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.02, 0.0, 0.98]], 0.95) == {0: 1, 2: 2}
    assert constant_layers([[0.0, 1.0]], 1.01) == {}


def test_calibration_fixes_constant_layers_and_serving_them_changes_nothing(tiny_run):
    """At a budget every token meets at the narrowest widths, calibration fixes the layers where every
    token took one width; the served form (fixed layers) gives exactly the routed loss and latency."""
    from flextron.dynamic_router import DynamicRouting, calibrate_dynamic, dynamic_eval
    from flextron.elastic import ElasticModel
    from flextron.latency_table import LatencyTable

    el = ElasticModel.load(tiny_run / "elastic")
    routing = DynamicRouting(el)
    table = LatencyTable.analytic(el.spec, "prefill:b1:s16")
    windows = torch.randint(0, el.spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    heads = lambda t: el.spec.full().heads  # noqa: E731
    routing.install()
    points = calibrate_dynamic(el, routing, windows, table, heads, [table.smallest_frac, 1.0], iters=4)
    low, full = points
    assert full["fixed_layers"] == {str(l): len(el.spec.mlp_widths[l]) - 1 for l in range(el.spec.num_layers)}
    assert low["fixed_layers"]  # the narrowest routing is constant too
    for p in points:
        routed = dynamic_eval(el, routing, windows, p["heads"], p["router_frac"], table, shift=p["shift"])
        served = dynamic_eval(el, routing, windows, p["heads"], p["router_frac"], table, shift=p["shift"],
                              fixed=p["fixed_layers"])
        assert served["loss"] == pytest.approx(routed["loss"], rel=1e-6)
        assert served["expected_frac"] == pytest.approx(routed["expected_frac"], rel=1e-9)
    routing.remove()


@pytest.mark.gpu
def test_dynamic_routing_on_cuda(tiny_run):
    """The CUDA path: grouped dynamic routing on the GPU."""
    from flextron.dynamic_router import DynamicRouting
    from flextron.elastic import ElasticModel

    el = ElasticModel.load(tiny_run / "elastic", device="cuda")
    routing = DynamicRouting(el)
    routing.install()
    routing.set(0.5, soft=False)
    with torch.no_grad():
        logits = el(input_ids=torch.randint(0, 256, (2, 16), device="cuda"), use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.device.type == "cuda"

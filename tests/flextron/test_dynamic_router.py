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


def test_router_training_leaves_the_model_frozen_and_joint_finetuning_moves_it(tiny_run):
    """Router training changes the router only; joint fine-tuning changes the weights too and freezes
    them again after. Budgets follow the seed's stream, carried on from one phase into the next."""
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
    hist = trainer.train_router(2, lr=1e-2)
    assert any((router_before[k] != v).any() for k, v in routing.state_dict().items())
    assert all(torch.equal(weights[n], p) for n, p in el.model.named_parameters() if n in weights)
    hist += trainer.joint_finetune(1, router_lr=1e-2, model_lr=1e-3)
    assert any(not torch.equal(weights[n], p) for n, p in el.model.named_parameters() if n in weights)
    assert not any(p.requires_grad for n, p in el.model.named_parameters() if n in weights)
    assert not el.model.training
    rng = random.Random(3)
    assert [h["budget_frac"] for h in hist] == [round(rng.uniform(table.smallest_frac, 1.0), 4) for _ in range(3)]
    assert [h["step"] for h in hist] == [0, 1, 0]


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

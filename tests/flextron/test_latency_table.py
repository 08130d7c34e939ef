"""The latency table: measured from a latency model, analytic from the spec's own costs, and the
expected latency and over-budget penalty the routers train against."""

import pytest
import torch

from flextron.latency_table import LatencyTable, expected_latency, over_budget_penalty
from flextron.spec import ElasticSpec, Regime, SubnetConfig
from flextron.surrogate import one_hot, sample_configs

SPEC = ElasticSpec.build("llama", num_layers=3, hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=4,
                         head_dim=16, vocab_size=1000, tie_word_embeddings=False, mlp_choices=4, head_choices=4)


@pytest.mark.parametrize("regime,cost", [
    ("prefill:b1:s64", SubnetConfig.flops),  # compute-bound: FLOPs
    ("prefill:b2:s512:bfloat16", SubnetConfig.flops),
    ("decode:b1:ctx256", SubnetConfig.bytes_moved),  # memory-bound: weights and KV cache streamed per token
    ("decode:b8:ctx1024:float16", SubnetConfig.bytes_moved),
])
def test_analytic_table_costs_every_config_as_subnetconfig_does(regime, cost):
    """The table of a never-profiled regime is `SubnetConfig`'s own cost model, not a second formula:
    every config's expected latency fraction is its cost over the full model's, heterogeneous ones too."""
    r = Regime.parse(regime)
    table = LatencyTable.analytic(SPEC, regime)
    assert (table.source, table.unit, table.regime) == (
        "analytic (FLOPs/bytes model; this regime was not profiled)", "relative", r.key)
    assert table.mlp.shape == (3, 4) and table.attn.shape == (3, 4)
    full = cost(SPEC.full(), SPEC, r)
    cfgs = sample_configs(SPEC, 20, seed=0)
    assert len({c.heads for c in cfgs}) > 4 and any(len(set(c.mlp_width)) > 1 for c in cfgs)  # heterogeneous
    got = expected_latency(table, *one_hot(SPEC, cfgs))
    want = torch.tensor([cost(c, SPEC, r) / full for c in cfgs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert table.smallest_frac == pytest.approx(cost(SPEC.smallest(), SPEC, r) / full, rel=1e-6)
    assert table.full == pytest.approx(full, rel=1e-6)


def test_table_from_a_latency_model_keeps_its_ms_and_names_the_device():
    class FittedModel:  # duck-typed like profiler's LatencyModel: only `layer_table_ms(spec)` is used
        def layer_table_ms(self, spec):
            assert spec is SPEC
            return {"attn_ms": torch.tensor([[1.0, 2.0], [1.0, 3.0]], dtype=torch.float64),
                    "mlp_ms": torch.tensor([[2.0, 4.0], [2.0, 5.0]], dtype=torch.float64), "fixed_ms": 1.5}

    table = LatencyTable.from_model(FittedModel(), SPEC, "decode:b1:ctx256:float32:eager", "NVIDIA H100")
    assert (table.source, table.unit) == ("measured (NVIDIA H100)", "ms")
    assert table.regime == "decode:b1:ctx256:float32:eager"
    assert table.attn.dtype == table.mlp.dtype == torch.float32 and table.fixed == 1.5
    assert table.full == 1.5 + (2.0 + 3.0) + (4.0 + 5.0)  # the last (widest) choice of every layer
    assert table.smallest_frac == pytest.approx((1.5 + (1.0 + 1.0) + (2.0 + 2.0)) / 15.5)
    # scaled to the full model's measured step (the budgets' reference): its full model costs exactly that,
    # every fraction stays the model's
    measured = LatencyTable.from_model(FittedModel(), SPEC, "decode:b1:ctx256:float32:eager", "NVIDIA H100", 31.0)
    assert measured.full == pytest.approx(31.0) and measured.fixed == pytest.approx(3.0)
    assert measured.smallest_frac == pytest.approx(table.smallest_frac)
    torch.testing.assert_close(measured.mlp, 2 * table.mlp)


def test_expected_latency_of_soft_choices_and_the_over_budget_penalty():
    table = LatencyTable(attn=torch.tensor([[1.0, 2.0]]), mlp=torch.tensor([[2.0, 6.0]]), fixed=2.0,
                         source="test", unit="ms", regime="decode:b1:ctx8:float32:eager")
    p_attn, p_mlp = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    assert float(expected_latency(table, p_mlp, p_attn)) == pytest.approx((2.0 + 1.5 + 5.0) / 10.0)
    e = torch.tensor([0.4, 0.5, 0.6])
    # nothing under or at budget; over it, weight * (r^2 + 0.1 r) of the relative overshoot r = 0.2
    assert over_budget_penalty(e, 0.5, 20.0).tolist() == pytest.approx([0.0, 0.0, 20.0 * (0.04 + 0.02)])
    assert over_budget_penalty(e, 0.5, 20.0, linear=0.5).tolist() == pytest.approx([0.0, 0.0, 20.0 * (0.04 + 0.1)])

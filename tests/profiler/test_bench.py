import pytest
import torch

from flextron.elastic import ElasticModel
from flextron.spec import Regime
from profiler.bench import RegimeBench


@pytest.fixture(scope="module")
def elastic(tiny_run):
    return ElasticModel.load(tiny_run / "elastic")


def test_a_decode_step_sees_the_same_context_every_call(elastic):
    """The timer calls a step hundreds of times: each call must write its token at the same cache
    slot (context `seq_len`), not one further each time."""
    regime = Regime.parse("decode:b2:ctx16")
    step = RegimeBench(elastic, regime, "cpu").forward_fn(elastic.spec.full())
    with torch.inference_mode():
        logits = [step().logits.clone() for _ in range(3)]
    assert logits[0].shape == (2, 1, elastic.spec.vocab_size)
    assert all(torch.equal(logits[0], x) for x in logits[1:])


@pytest.mark.parametrize("regime", ["decode:b2:ctx16", "prefill:b2:s8"])
def test_layer_cells_rerun_the_modules_real_call(elastic, regime):
    """At full width, an attention or MLP cell gives exactly what that module gave inside the model's
    own forward on the bench's inputs: its captured arguments (rotary embeddings, mask, cache) are
    the real ones."""
    spec, layer_idx = elastic.spec, 1
    bench = RegimeBench(elastic, Regime.parse(regime), "cpu")
    elastic.set_config(spec.full())
    layer = elastic.adapter.layers(elastic.model)[layer_idx]
    seen = {}
    hooks = [elastic.adapter.attn_of(layer).register_forward_hook(lambda m, a, o: seen.update(attn=o[0].clone())),
             elastic.adapter.mlp_of(layer).register_forward_hook(lambda m, a, o: seen.update(mlp=o.clone()))]
    cache = bench._new_cache() if bench.regime.phase == "decode" else None
    try:
        with torch.inference_mode():
            elastic.model(**bench.model_kwargs(cache))
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        attn = bench.cell_fn(layer_idx, "attn", spec.head_counts[layer_idx][-1])()[0]
        mlp = bench.cell_fn(layer_idx, "mlp", spec.mlp_widths[layer_idx][-1])()
    assert torch.equal(attn, seen["attn"]) and torch.equal(mlp, seen["mlp"])


def test_cells_run_at_their_width(elastic):
    regime = Regime.parse("prefill:b2:s8")
    spec, bench = elastic.spec, RegimeBench(elastic, regime, "cpu")
    with torch.inference_mode():
        mlp_full = bench.cell_fn(0, "mlp", spec.mlp_widths[0][-1])()
        mlp_narrow = bench.cell_fn(0, "mlp", spec.mlp_widths[0][0])()
        attn_full = bench.cell_fn(0, "attn", spec.head_counts[0][-1])()[0]
        attn_few = bench.cell_fn(0, "attn", spec.head_counts[0][0])()[0]
        embed = bench.cell_fn(-1, "embed", 0)()
        head = bench.cell_fn(-1, "head", 0)()
    assert mlp_narrow.shape == mlp_full.shape and not torch.allclose(mlp_narrow, mlp_full)
    assert attn_few.shape == attn_full.shape and not torch.allclose(attn_few, attn_full)
    assert embed.shape == (2, 8, spec.hidden_size)
    assert head.shape == (2, 1, spec.vocab_size)  # the LM head runs on the last position only, as in generation
    with pytest.raises(ValueError):
        bench.cell_fn(0, "norm", 0)

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


def test_real_text_inputs_feed_the_next_token_each_decode_step_and_fill_prefill(elastic):
    """With real text, decode step k feeds the k-th token (cycling), every config alike; prefill runs the
    text's first window, repeated from its start when the text is shorter."""
    text = torch.arange(10, 17)  # 7 tokens
    bench = RegimeBench(elastic, Regime.parse("decode:b2:ctx16"), "cpu", text=text)
    seen = []
    hook = elastic.model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        step = bench.forward_fn(elastic.spec.full())
        with torch.inference_mode():
            for _ in range(4):
                step()
    finally:
        hook.remove()
    fed = [x.reshape(-1).tolist() for x in seen[1:]]  # the first forward initialises the cache
    assert fed == [[10, 11], [12, 13], [14, 15], [10, 11]]  # 3 steps of 2 tokens, then again from the start
    pre = RegimeBench(elastic, Regime.parse("prefill:b2:s8"), "cpu", text=text)
    assert pre.ids.reshape(-1).tolist() == (list(range(10, 17)) * 3)[:16]
    with pytest.raises(ValueError, match="at least one token"):
        RegimeBench(elastic, Regime.parse("prefill:b2:s8"), "cpu", text=torch.tensor([], dtype=torch.long))


def test_interleaved_setups_wrap_each_measurement_of_their_key(elastic):
    """A key's setup is entered around every one of its measurements (and no other key's), and
    `ratios` gives each key's median ms and ratio to the full model."""
    import contextlib

    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import Precision

    events = []

    @contextlib.contextmanager
    def setup():
        events.append("enter")
        yield
        events.append("exit")

    with InterleavedSession(elastic, Regime.parse("prefill:b1:s8"), "cpu", reps=2, warmup=0) as s:
        s.run({"small": elastic.spec.smallest(), "plain": elastic.spec.uniform(0.5)}, 3, setups={"small": setup})
        r = s.ratios()
        assert events == ["enter", "exit"] * 3
        assert set(r) == {FULL, "small", "plain"} and r[FULL]["ratio_to_full"] == 1.0
        assert all(v["rounds"] == 3 and v["measured_ms"] > 0 for v in r.values())
        # more rounds toward a target no real machine reaches: the cap (4 rounds) stops it; the session counts them
        rec = s.refine(Precision(target_floor_pct=1e-9, max_rounds=5, max_seconds=1e9))
        assert rec["stop"] == "max_rounds" and rec["rounds_added"] == 2
        assert s.rounds_of[FULL] == 5 and max(r["round"] for r in s.samples) == 4
        assert s.ratios()[FULL]["rounds"] == 5 and all(r["regime"] == s.regime.key for r in s.samples)

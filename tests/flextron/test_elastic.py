import json

import pytest
import torch

from flextron import bridges as bridging
from flextron.convert import ConvertConfig, convert
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.models import TINY, load_source
from flextron.spec import SubnetConfig


@pytest.mark.parametrize("family", sorted(TINY))
def test_full_width_matches_original_for_every_family(family, tmp_path):
    summary = convert(ConvertConfig(model=family, out=str(tmp_path / family), calib_windows=2, calib_seq_len=64))
    assert summary["parity_max_abs_diff"] <= 1e-4
    assert summary["parity_fp64_max_abs_diff"] <= 1e-8
    # and against a freshly built original, on other tokens than convert used
    original, _ = load_source(family)
    elastic = ElasticModel.load(tmp_path / family / "elastic")
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        diff = (elastic(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4

def test_ranking_permutes_weights(tiny_run):
    imp = json.loads((tiny_run / "elastic" / "importance.json").read_text())
    # after the permutation the stored order is by descending importance
    assert imp["order"]["mlp"][0] != list(range(len(imp["order"]["mlp"][0])))
    elastic = ElasticModel.load(tiny_run / "elastic")
    ids = torch.randint(0, 300, (1, 16))
    acts = []
    down = elastic._linears[0]["down"]
    h = down.register_forward_pre_hook(lambda m, a: acts.append(a[0].abs().mean((0, 1))))
    with torch.no_grad():
        elastic(input_ids=ids)
    h.remove()
    a = acts[0]
    assert a[: len(a) // 4].mean() > a[-len(a) // 4 :].mean()

def _dense_sliced(model, spec, cfg: SubnetConfig):
    """`model` (a plain transformers model) with every layer's Linears cut by hand to `cfg`: rows of
    q/k/v and gate/up, columns of o and down, as new dense copies of the prefixes."""
    from torch import nn

    from flextron.models import adapter_for

    adapter = adapter_for(model.config)
    d, r = spec.head_dim, spec.q_per_kv
    for layer, w, h in zip(adapter.layers(model), cfg.mlp_width, cfg.heads):
        attn, mlp = adapter.attn_of(layer), adapter.mlp_of(layer)
        cuts = {(attn, adapter.q): (h * d, None), (attn, adapter.k): (h // r * d, None),
                (attn, adapter.v): (h // r * d, None), (attn, adapter.o): (None, h * d),
                (mlp, adapter.gate): (w, None), (mlp, adapter.up): (w, None), (mlp, adapter.down): (None, w)}
        for (holder, name), (rows, cols) in cuts.items():
            old = getattr(holder, name)
            new = nn.Linear(cols or old.in_features, rows or old.out_features, bias=old.bias is not None)
            new.weight = nn.Parameter(old.weight.detach()[:rows, :cols].clone())
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach()[:rows].clone())
            setattr(holder, name, new)
    return model

def test_a_config_runs_the_dense_model_sliced_to_it_without_copying_weights(tiny_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    elastic = ElasticModel.load(tiny_run / "elastic")
    spec = elastic.spec
    cfg = SubnetConfig(  # a different width and head count in every layer
        tuple(ws[i % len(ws)] for i, ws in enumerate(spec.mlp_widths)),
        tuple(hs[(i + 1) % len(hs)] for i, hs in enumerate(spec.head_counts)),
    )
    assert len(set(cfg.mlp_width)) > 1 and len(set(cfg.heads)) > 1
    ptrs = {n: p.data_ptr() for n, p in elastic.model.named_parameters()}
    storages = {p.untyped_storage().data_ptr() for p in elastic.model.parameters()}
    weight_storages = []
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):  # every matmul of the forward: is its weight a view of a parameter?
        weight_storages.append(weight.untyped_storage().data_ptr())
        return linear(x, weight, bias)

    ids = torch.randint(0, 300, (2, 12))
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad(), elastic.use(cfg):
        got = elastic(input_ids=ids).logits
    monkeypatch.undo()
    assert len(weight_storages) == 7 * spec.num_layers + 1  # q k v o gate up down per layer, then lm_head
    assert set(weight_storages) <= storages  # no weight was copied to run the config
    assert {n: p.data_ptr() for n, p in elastic.model.named_parameters()} == ptrs

    dense = _dense_sliced(AutoModelForCausalLM.from_pretrained(tiny_run / "elastic").eval(), spec, cfg)
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        full = elastic(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the config changes the answer: the test sees slicing


def _deleted_by_hand(model, skip, cfg):
    """`model` (plain transformers, sliced to the uniform `cfg`) rebuilt with fewer layers: the kept
    layers' weights copied into a fresh model whose config has `num_hidden_layers` (and
    `layer_types`) of the kept layers only."""
    import copy

    import transformers

    from flextron.models import adapter_for

    keep = [l for l in range(model.config.num_hidden_layers) if l not in set(skip)]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    config.intermediate_size = cfg.mlp_width[keep[0]]
    config.num_key_value_heads = cfg.heads[keep[0]] * config.num_key_value_heads // config.num_attention_heads
    config.num_attention_heads = cfg.heads[keep[0]]
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[l] for l in keep]
    small = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    adapter = adapter_for(model.config)
    sd = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if adapter.layers_path + "." in k:
            i = len(adapter.layers_path.split("."))
            l = int(parts[i])
            if l not in keep:
                continue
            parts[i] = str(keep.index(l))
        sd[".".join(parts)] = v
    missing, unexpected = small.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k or "lm_head" in k for k in missing), (missing, unexpected)
    return small


class _Bridged(torch.nn.Module):
    """A decoder layer with linear bridges written out by hand around it: `h + W (h / rms(h))` for each
    matrix in `before` on its input and in `after` on its output."""

    def __init__(self, inner, before, after, eps):
        super().__init__()
        self.inner, self.before, self.after, self.eps = inner, before, after, eps

    def _bridge(self, h, ws):
        for w in ws:
            h = h + (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)) @ w.to(h.dtype).T
        return h

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inner(self._bridge(hidden_states, self.before), *args, **kwargs)
        return self._bridge(out, self.after)


def _bridged_by_hand(small, keep, skip, bridges, eps):
    """`small` (the kept layers `keep`) with every skipped layer's bridge after the kept layer before it
    (before the first kept layer when none is)."""
    from flextron.models import adapter_for

    adapter = adapter_for(small.config)
    path, _, name = adapter.layers_path.rpartition(".")
    holder = small.get_submodule(path)
    layers = list(getattr(holder, name))
    wrapped = []
    for j, (l, layer) in enumerate(zip(keep, layers)):
        nxt = keep[j + 1] if j + 1 < len(keep) else 10**9
        before = [bridges[s] for s in sorted(skip) if s < l] if j == 0 else []
        after = [bridges[s] for s in sorted(skip) if l < s < nxt]
        wrapped.append(_Bridged(layer, before, after, eps))
    setattr(holder, name, torch.nn.ModuleList(wrapped))
    return small


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3", "tiny-qwen3"])
@pytest.mark.parametrize("skip", [(0,), (1,), (0, 2)])
def test_skipped_layers_give_the_model_with_those_layers_deleted(family, skip, tmp_path):
    """A skipped layer runs its fitted linear bridge in its place; checked against the dense model with the
    layers deleted by hand and the bridges written out by hand (and, without bridges, deletion alone)."""
    convert(ConvertConfig(model=family, out=str(tmp_path / "r"), calib_windows=4, calib_seq_len=64))
    elastic = ElasticModel.load(tmp_path / "r" / "elastic").to(dtype=torch.float64)
    spec = elastic.spec
    assert all(bridging.used(elastic.bridges, l) for l in skip)  # the tiny models' bridges all predict their layer
    cfg = spec.depth(skip, spec.uniform(0.5, 0.5))
    reference = _deleted_by_hand(_dense_sliced(ElasticModel.load(tmp_path / "r" / "elastic").model, spec, cfg),
                                 skip, cfg).to(torch.float64)
    reference = _bridged_by_hand(reference, cfg.active_layers, skip, elastic.bridges.double(), elastic.rms_eps)
    if reference.config.tie_word_embeddings:
        reference.tie_weights()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad(), elastic.use(cfg):
        got = elastic(input_ids=ids).logits
        # decode on a KV cache: the cache's layer 0 is the first layer that runs, as in the small model
        out = elastic(input_ids=ids[:, :20], use_cache=True)
        step = elastic(input_ids=ids[:, 20:21], cache=out.cache, use_cache=True).logits
        gen = elastic.model.generate(input_ids=ids[:1, :8], max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        want_gen = reference.generate(input_ids=ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert (got - want).abs().max().item() <= 1e-9
    assert (step[:, -1] - want[:, 20]).abs().max().item() <= 1e-9
    assert gen.tolist() == want_gen.tolist()
    # and back to the full model: every layer runs again under its own cache slot
    with torch.no_grad():
        full = elastic(input_ids=ids).logits
        original = ElasticModel.load(tmp_path / "r" / "elastic").to(dtype=torch.float64)(input_ids=ids).logits
    assert (full - original).abs().max().item() <= 1e-9


def test_without_bridges_a_skipped_layer_is_deleted(tmp_path):
    convert(ConvertConfig(model="tiny-llama", out=str(tmp_path / "r"), calib_windows=2, calib_seq_len=64,
                          bridges=False))
    assert not (tmp_path / "r" / "elastic" / bridging.BRIDGES_FILE).exists()
    elastic = ElasticModel.load(tmp_path / "r" / "elastic").to(dtype=torch.float64)
    assert elastic.bridges is None
    cfg = elastic.spec.depth((1,))
    reference = _deleted_by_hand(ElasticModel.load(tmp_path / "r" / "elastic").model, (1,), cfg).to(torch.float64)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad(), elastic.use(cfg):
        got = elastic(input_ids=ids).logits
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-9


def test_bridges_predict_held_out_updates_and_fall_back_to_the_identity():
    """A layer whose update is a known linear map of its normalised input gets that map back (held-out gain
    near 1); a layer whose update is noise unrelated to its input gets no bridge (zeros: the identity)."""
    torch.manual_seed(0)
    d, eps = 16, 1e-6

    class Linear(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, h):
            return h + bridging.rms(h, eps) @ self.w.T

    class Noise(torch.nn.Module):
        def forward(self, h):
            return h + torch.randn_like(h)

    class Stack(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)
            self.config = type("C", (), {"hidden_size": d})()

        def forward(self, h):
            for layer in self.layers:
                h = layer(h)
            return h

    w = torch.randn(d, d)
    model = Stack([Linear(w), Noise()])
    with bridging.BridgeStats(model, model.layers, eps) as stats:
        for held_out in (False, False, False, True):
            stats.held_out = held_out
            model(torch.randn(8, 33, d))
    weights, gains = stats.fit()
    assert gains[0] > 0.99 and torch.allclose(weights[0], w, atol=0.05)
    assert gains[1] <= 0 and not weights[1].any()
    assert stats.tokens == [3 * 8 * 32, 8 * 32]  # position 0 of every window left out
    with pytest.raises(FlextronError, match="--calib-windows"):
        bridging.BridgeStats(model, model.layers, eps).fit()  # no text: a clear error


def test_a_saved_model_keeps_every_layer_while_a_depth_config_is_set(tiny_run, tmp_path):
    elastic = ElasticModel.load(tiny_run / "elastic")
    elastic.set_config(elastic.spec.depth([1]))
    elastic.save(tmp_path / "saved")
    again = ElasticModel.load(tmp_path / "saved")
    assert len(again.adapter.layers(again.model)) == elastic.spec.num_layers
    assert elastic.config.skip == (1,)  # the config in use is restored after saving

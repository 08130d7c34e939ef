"""flextron/hf_export.py: sub-networks sliced into standalone transformers checkpoints."""

import pytest
import torch

from flextron.elastic import ElasticModel, spec_from_model
from flextron.errors import FlextronError
from flextron.hf_export import export_subnet, load_subnet
from flextron.models import TINY, tiny_model
from flextron.spec import SubnetConfig


def test_export_uniform_loads_with_plain_transformers(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    elastic = ElasticModel.load(tiny_run / "elastic")
    cfg = elastic.spec.uniform(0.5, 0.5)
    info = export_subnet(elastic, cfg, tmp_path / "u")
    assert info["uniform"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u")
    assert plain.config.intermediate_size == cfg.mlp_width[0]
    assert all(p.is_contiguous() for p in plain.parameters())
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad(), elastic.use(cfg):
        ref = elastic(input_ids=ids).logits
        assert (plain(input_ids=ids).logits - ref).abs().max().item() < 1e-5

def test_export_heterogeneous_runs_generate(tiny_run, tmp_path):
    elastic = ElasticModel.load(tiny_run / "elastic")
    spec = elastic.spec
    cfg = SubnetConfig(
        tuple(ws[i % len(ws)] for i, ws in enumerate(spec.mlp_widths)),
        tuple(hs[(i + 1) % len(hs)] for i, hs in enumerate(spec.head_counts)),
    )
    assert len(set(cfg.mlp_width)) > 1
    info = export_subnet(elastic, cfg, tmp_path / "h")
    assert not info["uniform"] and info["loader"] == "flextron.load_subnet"
    model = load_subnet(tmp_path / "h")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad(), elastic.use(cfg):
        ref = elastic(input_ids=ids).logits
        assert (model(input_ids=ids).logits - ref).abs().max().item() < 1e-5
        out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        ref_out = elastic.model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.tolist() == ref_out.tolist()


# Gemma 3 with a mixed attention pattern, so that a layer's type moving with it is visible in the logits
# (the tiny model's window is 16 tokens; the inputs below are 24).
_GEMMA3_MIXED = ["full_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_a_depth_config_exports_a_plain_checkpoint_without_the_skipped_layers(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    if family == "tiny-gemma3":
        cls_name, extra = TINY[family]
        monkeypatch.setitem(TINY, family, (cls_name, {**extra, "layer_types": _GEMMA3_MIXED}))
    model, tok = tiny_model(family)
    elastic = ElasticModel(model, tok, spec_from_model(model, 16, 4, 4))
    spec = elastic.spec
    cfg = spec.depth([1], spec.uniform(0.5, 0.5))
    elastic.set_config(spec.depth([0]))  # another depth config in use: the export must not read its layers
    info = export_subnet(elastic, cfg, tmp_path / "d")
    assert info["uniform"] and info["num_layers"] == 2 and elastic.config == spec.depth([0])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert plain.config.num_hidden_layers == 2 and len(plain.model.layers) == 2
    assert plain.config.intermediate_size == cfg.mlp_width[0] == spec.intermediate_size // 2
    if family == "tiny-gemma3":
        assert plain.config.layer_types == ["full_attention", "full_attention"]  # layers 0 and 2
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad(), elastic.use(cfg):
        ref = elastic(input_ids=ids).logits
        got = plain(input_ids=ids).logits
        assert (got - ref).abs().max().item() < 1e-5
    with torch.no_grad(), elastic.use(spec.uniform(0.5, 0.5)):
        assert (got - elastic(input_ids=ids).logits).abs().max().item() > 1e-2  # the skip changed the answer


def test_a_heterogeneous_depth_config_round_trips_through_load_subnet(tiny_run, tmp_path):
    elastic = ElasticModel.load(tiny_run / "elastic")
    spec = elastic.spec
    widths = SubnetConfig(
        tuple(ws[i % len(ws)] for i, ws in enumerate(spec.mlp_widths)),
        tuple(hs[(i + 1) % len(hs)] for i, hs in enumerate(spec.head_counts)),
    )
    cfg = spec.depth([0], widths)  # layers 1 and 2 run, with different widths and heads
    assert not cfg.is_uniform()
    info = export_subnet(elastic, cfg, tmp_path / "h")
    assert not info["uniform"] and info["num_layers"] == 2 and info["bridges"] == [0]  # layer 0's bridge runs first
    model = load_subnet(tmp_path / "h")
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == 2
    assert [layer.mlp.gate_proj.out_features for layer in layers] == [cfg.mlp_width[1], cfg.mlp_width[2]]
    assert [layer.self_attn.q_proj.out_features for layer in layers] == [h * spec.head_dim for h in cfg.heads[1:]]
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad(), elastic.use(cfg):
        ref = elastic(input_ids=ids).logits
        assert (model(input_ids=ids).logits - ref).abs().max().item() < 1e-5
        out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        ref_out = elastic.model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.tolist() == ref_out.tolist()


def test_a_uniform_depth_config_with_a_bridge_loads_with_load_subnet(tiny_run, tmp_path):
    """Uniform widths, but the skipped layer's bridge must run: not a plain checkpoint; load_subnet runs it."""
    from flextron import bridges as bridging

    elastic = ElasticModel.load(tiny_run / "elastic")
    spec = elastic.spec
    cfg = spec.depth([1], spec.uniform(0.5, 0.5))
    assert bridging.used(elastic.bridges, 1)
    info = export_subnet(elastic, cfg, tmp_path / "b")
    assert not info["uniform"] and info["bridges"] == [1] and info["loader"] == "flextron.load_subnet"
    model = load_subnet(tmp_path / "b")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad(), elastic.use(cfg):
        ref = elastic(input_ids=ids).logits
        got = model(input_ids=ids).logits
        assert (got - ref).abs().max().item() < 1e-5
        out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        assert out.tolist() == elastic.model.generate(ids[:, :4], max_new_tokens=5, do_sample=False).tolist()
    elastic.bridges = None
    with torch.no_grad(), elastic.use(cfg):
        assert (got - elastic(input_ids=ids).logits).abs().max().item() > 1e-3  # the bridge shows in the logits


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("skip, message", [
    pytest.param("skip:3", "skips layer 3, which does not exist; layers are 0..2", id="missing-layer"),
    pytest.param("skip:0,1,2", "skips all 3 layers; keep at least one", id="every-layer")])
def test_export_refuses_skipping_a_missing_layer_or_every_layer(tiny_run, tmp_path, fmt, skip, message):
    from search.export import ExportConfig, export

    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    with pytest.raises(FlextronError, match=message):
        export(ExportConfig(run=str(tiny_run), config=skip, out=str(out), format=fmt))
    assert not list(tmp_path.iterdir())

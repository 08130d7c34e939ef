"""flextron/hf_export.py: sub-networks sliced into standalone transformers checkpoints."""

import torch

from flextron.elastic import ElasticModel
from flextron.hf_export import export_subnet, load_subnet
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

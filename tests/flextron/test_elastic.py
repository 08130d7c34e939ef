import json

import pytest
import torch

from flextron.convert import ConvertConfig, convert
from flextron.elastic import ElasticModel
from flextron.export import export_subnet, load_subnet
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


def test_smaller_config_is_a_prefix_without_copies(tiny_run):
    elastic = ElasticModel.load(tiny_run / "elastic")
    spec = elastic.spec
    ptrs = {n: p.data_ptr() for n, p in elastic.model.named_parameters()}
    small = spec.smallest()
    elastic.set_config(small)
    assert {n: p.data_ptr() for n, p in elastic.model.named_parameters()} == ptrs
    gate = elastic._linears[0]["gate"]
    assert gate.active_out == small.mlp_width[0]
    q = elastic._linears[0]["q"]
    assert q.active_out == small.heads[0] * spec.head_dim
    # running a config is the same as running the dense model sliced to it
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        sliced = elastic(input_ids=ids).logits
        elastic.set_config(spec.full())
        full = elastic(input_ids=ids).logits
    assert not torch.allclose(sliced, full)


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

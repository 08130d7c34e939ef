"""GGUF export: llama.cpp runs every config flextron can pick, with the elastic model's logits.

llama.cpp keeps its KV cache in f16 unless told otherwise; parity runs use an f32 cache
(`type_k=type_v=0`) so that the weights' type is the only rounding compared.
"""

import hashlib
import sys

import numpy as np
import pytest
import torch
from conftest import require_llama_cpp

from flextron.elastic import ElasticModel, spec_from_model
from flextron.errors import FlextronError
from flextron.gguf_export import write_gguf
from flextron.models import tiny_model
from flextron.spec import SubnetConfig

llama_cpp = require_llama_cpp()
F32 = 0  # GGML_TYPE_F32, for the KV cache

IDS = [5, 70, 33, 101, 200, 7, 9, 250, 41, 3, 120, 64]


def _elastic(family):
    model, tok = tiny_model(family)
    return ElasticModel(model, tok, spec_from_model(model, 16, 4, 4))


def _configs(spec):
    hetero = SubnetConfig(  # different query heads, KV heads and FFN widths in every layer
        tuple(spec.mlp_widths[i][i % len(spec.mlp_widths[i])] for i in range(spec.num_layers)),
        tuple(spec.head_counts[i][(i + 1) % len(spec.head_counts[i])] for i in range(spec.num_layers)))
    assert len(set(hetero.heads)) == min(spec.num_layers, len(spec.head_counts[0]))
    assert len(set(hetero.mlp_width)) == min(spec.num_layers, len(spec.mlp_widths[0]))
    return {"full": spec.full(), "uniform": spec.uniform(0.5, 0.5), "hetero": hetero}


def _logits(path, ids, threads=1):
    from profiler.llamacpp import require_binding

    require_binding()  # silences llama.cpp's log
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)),
                          logits_all=True, verbose=False, n_threads=threads, type_k=F32, type_v=F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def _reference(elastic, cfg, ids):
    with torch.no_grad(), elastic.use(cfg):
        return elastic.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_f32_gguf_matches_the_elastic_model(family, tmp_path):
    elastic = _elastic(family)
    tok_dir = tmp_path / "tok"
    elastic.tokenizer.save_pretrained(tok_dir)
    for name, cfg in _configs(elastic.spec).items():
        out = write_gguf(elastic, cfg, tmp_path / f"{name}.gguf", "f32", elastic_dir=tok_dir)
        assert out["arch"] == ("deci" if name == "hetero" else "llama")
        got, ref = _logits(tmp_path / f"{name}.gguf", IDS), _reference(elastic, cfg, IDS)
        assert np.abs(got - ref).max() < 1e-3, (family, name)


def _block_count(path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    return reader.fields[f"{arch}.block_count"].contents()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_skipped_layers_are_not_written_and_llama_cpp_matches(family, tmp_path):
    """Uniform widths over the kept layers: a plain `llama` file with fewer blocks; different widths:
    `deci` with the kept layers' shapes (layer 0 skipped, so block 0 is layer 1)."""
    elastic = _elastic(family)
    spec = elastic.spec
    tok_dir = tmp_path / "tok"
    elastic.tokenizer.save_pretrained(tok_dir)
    configs = {"llama": spec.depth([1], spec.uniform(0.5, 0.5)), "deci": spec.depth([0], _configs(spec)["hetero"])}
    assert configs["llama"].is_uniform() and not configs["deci"].is_uniform()
    elastic.set_config(spec.depth([2]))  # another depth config in use: the export must not read its layers
    for arch, cfg in configs.items():
        out = write_gguf(elastic, cfg, tmp_path / f"{arch}.gguf", "f32", elastic_dir=tok_dir)
        assert out["arch"] == arch and out["num_layers"] == _block_count(tmp_path / f"{arch}.gguf") == 2
        got, ref = _logits(tmp_path / f"{arch}.gguf", IDS), _reference(elastic, cfg, IDS)
        assert np.abs(got - ref).max() < 1e-3, (family, arch)
        without_skip = SubnetConfig(cfg.mlp_width, cfg.heads)
        assert np.abs(got - _reference(elastic, without_skip, IDS)).max() > 1e-2  # the skip shows in the logits
    assert elastic.config == spec.depth([2])


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_bridged_skips_become_linear_attention_blocks_and_llama_cpp_matches(family, tmp_path):
    """With linear bridges, a skipped layer is a deci block of its own (linear attention, zero FFN), uniform
    widths or not, with layer 0 skipped too (its bridge is then the first block)."""
    elastic = _elastic(family)
    spec = elastic.spec
    torch.manual_seed(0)
    elastic.bridges = torch.randn(spec.num_layers, spec.hidden_size, spec.hidden_size) * 0.05
    elastic.bridges[2] = 0  # a layer without a bridge: skipped, not written
    tok_dir = tmp_path / "tok"
    elastic.tokenizer.save_pretrained(tok_dir)
    for name, cfg in {"uniform": spec.depth([1], spec.uniform(0.5, 0.5)),
                      "hetero": spec.depth([0, 2], _configs(spec)["hetero"])}.items():
        out = write_gguf(elastic, cfg, tmp_path / f"{name}.gguf", "f32", elastic_dir=tok_dir)
        assert out["arch"] == "deci" and out["bridges"] == [l for l in cfg.skip if l != 2]
        assert _block_count(tmp_path / f"{name}.gguf") == len(cfg.active_layers) + len(out["bridges"])
        got, ref = _logits(tmp_path / f"{name}.gguf", IDS), _reference(elastic, cfg, IDS)
        assert np.abs(got - ref).max() < 1e-3, (family, name)
        plain = elastic.bridges
        elastic.bridges = None
        assert np.abs(got - _reference(elastic, cfg, IDS)).max() > 1e-2  # the bridges show in the logits
        elastic.bridges = plain


def test_f16_and_q8_0_stay_close_and_are_smaller(tmp_path):
    elastic = _elastic("tiny-llama")
    tok_dir = tmp_path / "tok"
    elastic.tokenizer.save_pretrained(tok_dir)
    cfg = _configs(elastic.spec)["hetero"]
    ref = _reference(elastic, cfg, IDS)
    sizes = {}
    # measured on this config (benchmarks/gguf_parity.py): f16 max |diff| 1.3e-3, q8_0 3.5e-2 (logits ~1.1)
    for t, tol in (("f32", 1e-3), ("f16", 5e-3), ("q8_0", 6e-2)):
        info = write_gguf(elastic, cfg, tmp_path / f"{t}.gguf", t, elastic_dir=tok_dir)
        sizes[t] = info["bytes"]
        assert np.abs(_logits(tmp_path / f"{t}.gguf", IDS) - ref).max() < tol, t
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


@pytest.mark.parametrize("family", ["tiny-qwen3", "tiny-gemma3"])
def test_families_without_a_gguf_mapping_are_refused_by_name(family, tmp_path):
    elastic = _elastic(family)
    with pytest.raises(FlextronError, match=f"{elastic.spec.family}' family"):
        write_gguf(elastic, elastic.spec.full(), tmp_path / "m.gguf", "f16", elastic_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_bad_gguf_input_is_refused_and_nothing_is_overwritten(tmp_path):
    elastic = _elastic("tiny-llama")
    tok_dir = tmp_path / "tok"
    elastic.tokenizer.save_pretrained(tok_dir)
    out = tmp_path / "m.gguf"
    write_gguf(elastic, elastic.spec.full(), out, "f16", elastic_dir=tok_dir)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(FlextronError, match="--overwrite"):
        write_gguf(elastic, elastic.spec.smallest(), out, "f16", elastic_dir=tok_dir)
    with pytest.raises(FlextronError, match="q4_k.*f32, f16, q8_0"):
        write_gguf(elastic, elastic.spec.smallest(), tmp_path / "n.gguf", "q4_k", elastic_dir=tok_dir)
    with pytest.raises(FlextronError, match="does not end in .gguf"):
        write_gguf(elastic, elastic.spec.smallest(), tmp_path / "model", "f16", elastic_dir=tok_dir)
    with pytest.raises(FlextronError, match="not allowed"):
        write_gguf(elastic, SubnetConfig((7, 7, 7), (8, 8, 8)), tmp_path / "n.gguf", "f16", elastic_dir=tok_dir)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "tok"]  # no temp file left either
    write_gguf(elastic, elastic.spec.smallest(), out, "f16", elastic_dir=tok_dir, overwrite=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() != before


def test_engine_without_the_binding_names_the_install_command(monkeypatch):
    from profiler import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if it were not installed
    with pytest.raises(FlextronError, match="pip install llama-cpp-python==0.3.36"):
        llamacpp.require_binding()


@pytest.mark.slow
def test_real_smollm2_gguf_matches_and_tokenizes_like_the_source():
    """SmolLM2-135M (its tokenizer copied from the source GGUF): F32 within 1e-3 at full, uniform and
    heterogeneous configs; F16 and Q8_0 within what we measured (docs/results.md)."""
    import pydoc_data.topics
    import tempfile
    from pathlib import Path

    from flextron.models import load_source, source_gguf

    model, tok = load_source("smollm2-135m")
    elastic = ElasticModel(model, tok, spec_from_model(model, 64, 8, 4))
    text = pydoc_data.topics.topics["assignment"][:1200]
    ids = tok(text)["input_ids"][:160]
    src = source_gguf("smollm2-135m")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prompt = ids[:32]  # the fixed prompt
        for name, cfg in _configs(elastic.spec).items():
            write_gguf(elastic, cfg, d / f"{name}.gguf", "f32", source_gguf=src)
            got, ref32 = _logits(d / f"{name}.gguf", prompt, 2), _reference(elastic, cfg, prompt)
            elastic.model.double()
            ref64 = _reference(elastic, cfg, prompt)
            elastic.model.float()
            # Against fp64: within 1e-3, or within transformers' own fp32 error where that is larger
            # (benchmarks/gguf_parity.py: full 3.9e-5 vs 7.8e-5, uniform 1.5e-4 vs 2.7e-4, hetero 1.06e-3 vs 2.7e-3).
            assert np.abs(got - ref64).max() < max(1e-3, np.abs(ref32 - ref64).max()), name
        llm = llama_cpp.Llama(model_path=str(d / "full.gguf"), n_ctx=64, verbose=False, vocab_only=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]

        def nll(logits):
            lp = torch.log_softmax(torch.tensor(logits[:-1]), -1)
            return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())

        ref = nll(_reference(elastic, elastic.spec.full(), ids))
        # measured (benchmarks/gguf_parity.py, 256 tokens): f16 -0.0001 nats per token, q8_0 +0.008
        for t, tol in (("f16", 0.005), ("q8_0", 0.05)):
            write_gguf(elastic, elastic.spec.full(), d / f"{t}.gguf", t, source_gguf=src)
            assert abs(nll(_logits(d / f"{t}.gguf", ids, 2)) - ref) < tol, t

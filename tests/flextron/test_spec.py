import pytest

from flextron.errors import FlextronError
from flextron.spec import ElasticSpec, Regime, SubnetConfig, aligned_widths


def smol_spec(**kw):
    return ElasticSpec.build("llama", 30, 576, 1536, 9, 3, 64, 49152, **kw)


def test_widths_are_aligned_and_end_at_full():
    spec = smol_spec()
    assert spec.mlp_widths[0] == (192, 384, 576, 768, 960, 1152, 1344, 1536)
    assert all(w % 64 == 0 for w in spec.mlp_widths[0])
    # An unaligned full width (11008 = 172*64 is aligned; 11000 is not) is kept as the full choice.
    assert aligned_widths(11000, 8, 64)[-1] == 11000
    assert all(w % 64 == 0 for w in aligned_widths(11000, 8, 64)[:-1])


def test_head_choices_drop_whole_kv_groups():
    assert smol_spec().head_counts[0] == (3, 6, 9)
    mha = ElasticSpec.build("llama", 2, 4096, 11008, 32, 32, 128, 32000)
    assert mha.head_counts[0] == (8, 16, 24, 32)


def test_validate_names_layer_and_allowed_values():
    spec = smol_spec()
    bad = SubnetConfig((1536,) * 29 + (1000,), (9,) * 30)
    with pytest.raises(FlextronError, match=r"layer 29: MLP width 1000 is not allowed; choose one of \[192"):
        spec.validate(bad)
    with pytest.raises(FlextronError, match=r"layer 0: head count 4"):
        spec.validate(SubnetConfig((1536,) * 30, (4,) + (9,) * 29))
    with pytest.raises(FlextronError, match="30"):
        spec.validate(SubnetConfig((1536,), (9,)))


def test_json_round_trip():
    spec = smol_spec()
    cfg = SubnetConfig(tuple([192, 1536] * 15), tuple([3, 9] * 15))
    assert SubnetConfig.from_json(cfg.to_json()) == cfg
    assert hash(SubnetConfig.from_json(cfg.to_json())) == hash(cfg)
    assert ElasticSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(FlextronError, match="not valid JSON"):
        SubnetConfig.from_json("{nope")


def test_costs_scale_with_width():
    spec = smol_spec()
    full, small = spec.full(), spec.smallest()
    # SmolLM2-135M has 134,515,008 parameters with tied embeddings (its safetensors hold exactly that many).
    assert full.param_count(spec) == 134_515_008
    assert small.param_count(spec) < full.param_count(spec)
    assert full.kv_bytes_per_token(spec, "bfloat16") == 30 * 2 * 3 * 64 * 2
    assert small.kv_bytes_per_token(spec, "bfloat16") * 3 == full.kv_bytes_per_token(spec, "bfloat16")
    dec, pre = Regime.parse("decode:b1:ctx1024"), Regime.parse("prefill:b1:s512")
    assert full.flops(spec, pre) > 500 * full.flops(spec, dec) / 1.5
    assert small.bytes_moved(spec, dec) < full.bytes_moved(spec, dec)
    # decode is bandwidth bound: about one weight read per token
    assert full.bytes_per_token(spec, dec) > 4 * (full.param_count(spec) - 49152 * 576)


def test_regime_parse_and_errors():
    r = Regime.parse("decode:b64:ctx1024:bfloat16:cuda_graph")
    assert (r.phase, r.batch, r.seq_len, r.dtype, r.mode) == ("decode", 64, 1024, "bfloat16", "cuda_graph")
    assert Regime.parse(r.key) == r
    assert Regime.parse("prefill:b8:s1024").new_tokens == 1024
    for bad in ("decode:b1:s1024", "prefill:b1", "decode:b1:ctx10:fp8"):
        with pytest.raises(FlextronError):
            Regime.parse(bad)


def test_config_json_values_are_type_checked_not_truncated():
    for bad, msg in [('{"mlp_width": [64.9], "heads": [2]}', "whole numbers, got 64.9"),
                     ('{"mlp_width": "64", "heads": [2]}', "must be a list"),
                     ('{"mlp_width": [null], "heads": [2]}', "got None"),
                     ('{"mlp_width": [1e400], "heads": [2]}', "got inf"),
                     ('{"mlp_width": [true], "heads": [2]}', "got True"),
                     ('{"mlp_width": [0], "heads": [2]}', "must be positive")]:
        with pytest.raises(FlextronError, match=msg):
            SubnetConfig.from_json(bad)
    assert SubnetConfig.from_json('{"mlp_width": [64.0], "heads": [2]}').mlp_width == (64,)


def test_a_regime_naming_two_dtypes_or_modes_is_refused():
    with pytest.raises(FlextronError, match="two dtypes"):
        Regime.parse("decode:b1:ctx32:float32:bfloat16")
    with pytest.raises(FlextronError, match="two modes"):
        Regime.parse("decode:b1:ctx32:eager:cuda_graph")


def test_resolve_regime_names_one_key_or_lists_them():
    from flextron.spec import resolve_regime

    f32, bf16 = "decode:b1:ctx256:float32:eager", "decode:b1:ctx256:bfloat16:eager"
    pre = "prefill:b1:s128:float32:eager"
    assert resolve_regime([f32, pre], f32) == f32
    assert resolve_regime([f32, pre], "decode:b1:ctx256") == f32  # a short form names the one key it begins
    assert resolve_regime([f32, f32], None) == f32  # the only key
    with pytest.raises(FlextronError, match=r"decode:b1:ctx256 matches several profiled regimes "
                                            rf"\['{bf16}', '{f32}'\]; name one in full"):
        resolve_regime([f32, bf16], "decode:b1:ctx256")
    # a prefix that is not a whole short form (ctx25 of ctx256) names nothing
    with pytest.raises(FlextronError, match=rf"regime decode:b1:ctx25 was not fitted \(fitted: \['{f32}', '{pre}'\]\)"
                                            r"; run it"):
        resolve_regime([pre, f32], "decode:b1:ctx25", "fitted", fix="run it")
    with pytest.raises(FlextronError, match=r"several regimes were profiled .*; name one with --regime"):
        resolve_regime([f32, pre], None)
    with pytest.raises(FlextronError, match="no regime was profiled; profile one"):
        resolve_regime([], None, fix="profile one")
    with pytest.raises(FlextronError, match="--regime: cannot read regime 'decode:b1'"):
        resolve_regime([f32], "decode:b1")


def test_regime_slug_is_one_file_name_per_regime():
    keys = ["decode:b1:ctx256:float32:eager", "decode:b1:ctx256:bfloat16:eager", "prefill:b8:s1024:bfloat16:cuda_graph",
            "decode:b1:ctx256:q8_0:llamacpp"]
    slugs = [Regime.parse(k).slug for k in keys]
    assert slugs[0] == "decode_b1_ctx256_float32_eager"
    assert slugs[2] == "prefill_b8_s1024_bfloat16_cuda_graph"
    assert len(set(slugs)) == len(keys)  # distinct regimes never share a part file or a folder
    assert all("/" not in s and ":" not in s and not s.startswith(".") for s in slugs)


def test_random_config_without_depth_replays_its_known_sequence():
    """The profiler's end-to-end set and resumed runs replay `random_config(rng)`: its draws are pinned."""
    import random

    spec = ElasticSpec.build("llama", 4, 64, 256, 8, 4, 16, 100)
    known = [SubnetConfig((256, 256, 64, 192), (8, 8, 6, 8)), SubnetConfig((192, 128, 128, 192), (4, 2, 6, 4))]
    for kw in ({}, {"max_skip": 0}):
        rng = random.Random(0)
        assert [spec.random_config(rng, **kw) for _ in range(2)] == known


def test_random_config_skips_zero_to_max_skip_layers_canonically():
    """Every count 0..max_skip occurs, never more; the widths are drawn as without depth; a skipped
    layer's entries are the full ones, so configs that run the same network are equal."""
    import random

    spec = ElasticSpec.build("llama", 10, 64, 256, 8, 4, 16, 100)
    counts = set()
    for seed in range(200):
        cfg = spec.random_config(random.Random(seed), max_skip=4)
        widths_only = spec.random_config(random.Random(seed))
        counts.add(len(cfg.skip))
        assert spec.validate(cfg) == spec.canonical(cfg) == cfg
        assert all(cfg.mlp_width[l] == widths_only.mlp_width[l] and cfg.heads[l] == widths_only.heads[l]
                   for l in cfg.active_layers)
        assert all(cfg.mlp_width[l] == 256 and cfg.heads[l] == 8 for l in cfg.skip)
    assert counts == {0, 1, 2, 3, 4}
    for bad in (-1, 10, 2.0, True):
        with pytest.raises(FlextronError, match=r"max_skip must be a whole number of layers in 0\.\.9"):
            spec.random_config(random.Random(0), max_skip=bad)

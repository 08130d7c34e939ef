"""The llama.cpp engine: probes give per-layer terms, profiles are keyed by engine, and the whole
chain (fit, search, verify, lookup, export) runs on what llama.cpp measured."""

import json
import math

import numpy as np
import pytest
from conftest import require_llama_cpp

from flextron.errors import FlextronError
from flextron.spec import ElasticSpec, Regime

llama_cpp = require_llama_cpp()


def test_layer_terms_recover_known_per_layer_costs():
    """Step times built from known costs (fixed F, attention a(h), MLP m(w), all layers alike, layer
    0 keeping the narrowest heads in the attention-free probe): the terms come back exactly."""
    from profiler.llamacpp import layer_terms, probe_keys

    spec = ElasticSpec.build(family="llama", num_layers=6, hidden_size=64, intermediate_size=256, num_heads=8,
                             num_kv_heads=4, head_dim=8, vocab_size=100, alignment=64, mlp_choices=4, head_choices=4)
    a = {h: 0.1 + 0.05 * h for h in spec.head_counts[0]}
    m = {w: 0.2 + 0.003 * w for w in spec.mlp_widths[0]}
    F, L, h0, wfull = 1.7, spec.num_layers, spec.head_counts[0][0], spec.mlp_widths[0][-1]
    times = {}
    for kind, width in probe_keys(spec):
        if kind == "attn":
            times[(kind, width)] = F + (a[h0] if width == 0 else L * a[width]) + L * m[wfull]
        else:
            times[(kind, width)] = F + L * a[spec.head_counts[0][-1]] + L * m[width]
    terms = layer_terms(times, spec)
    for h in spec.head_counts[0]:
        assert terms[("attn", h)] == pytest.approx(a[h])
    w0 = spec.mlp_widths[0][0]
    for w in spec.mlp_widths[0]:  # relative to the narrowest width (llama.cpp has no FFN-free layers)
        assert terms[("mlp", w)] == pytest.approx(m[w] - m[w0])


def test_llamacpp_regimes_are_checked():
    assert Regime.parse("decode:b1:ctx64:q8_0:llamacpp").engine == "llamacpp"
    assert Regime.parse("decode:b1:ctx64").engine == "torch"
    with pytest.raises(FlextronError, match="batch 1"):
        Regime.parse("decode:b2:ctx64:llamacpp", dtype="q8_0")
    with pytest.raises(FlextronError, match="llama.cpp only"):
        Regime.parse("decode:b1:ctx64:q8_0:eager")
    with pytest.raises(FlextronError, match="bfloat16"):
        Regime.parse("decode:b1:ctx64:bfloat16:llamacpp")


def test_profile_in_llamacpp_is_keyed_by_engine_and_refuses_mixing(tiny_run, tmp_path):
    import shutil

    import pandas as pd

    from profiler.fit import FitConfig, fit
    from profiler.sweep import ProfileConfig, profile

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    kw = dict(run=str(run), regime=("decode:b1:ctx32",), e2e_random=4, rounds=3, reps=2, warmup=1, max_rounds=3)
    out = profile(ProfileConfig(engine="llamacpp", **kw))
    rk = "decode:b1:ctx32:q8_0:llamacpp"
    assert out["regimes"] == [rk]
    layers = pd.read_parquet(run / "profile" / "layers.parquet")
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    assert set(layers["engine"]) == set(e2e["engine"]) == {"llamacpp"}
    assert set(layers["regime"]) == set(e2e["regime"]) == {rk}
    # every layer has every head count and MLP width, each a finite time (attention terms are differences
    # of two timed GGUF probes: their sign depends on the machine's noise, so it is not asserted)
    assert len(layers) == 3 * (4 + 4) and (layers["status"] == "ok").all()
    assert layers["latency_ms_median"].map(math.isfinite).all()
    assert (e2e["status"] == "ok").all() and e2e["ratio_to_full"].notna().all()
    assert json.loads((run / "profile" / "device.json").read_text())["engine"] == "llamacpp"
    with pytest.raises(FlextronError, match="--engine"):
        profile(ProfileConfig(engine="torch", **kw))  # the same run in another engine
    with pytest.raises(FlextronError, match="torch engine but --engine is llamacpp"):
        ProfileConfig(engine="llamacpp", **{**kw, "regime": ("decode:b1:ctx32:float32:eager",)}).regimes()
    fitted = fit(FitConfig(run=str(run)))
    assert rk in fitted


def test_the_chain_runs_on_llamacpp_and_exports_what_it_measured(tmp_path):
    """run → lookup → export --budget-ms --format gguf: the GGUF holds the row's config in the type
    it was measured with, and llama.cpp runs it with the elastic model's logits."""
    import torch

    from flextron.cli.run import RunConfig, run_pipeline
    from flextron.elastic import ElasticModel
    from search.export import ExportConfig, export
    from search.lookup import LookupConfig, lookup

    run = tmp_path / "run"
    out = run_pipeline(RunConfig(model="tiny-llama", out=str(run), engine="llamacpp", regime=("decode:b1:ctx32",),
                                 trials=4, e2e_random=6, rounds=3, max_rounds=3, eval_windows=2))
    budget = max(out["lookup_budgets_ms"]) * 1.01
    row = lookup(LookupConfig(run=str(run), budget_ms=budget))
    assert row["engine"] == "llamacpp" and row["budget_ms"] <= budget and row["ppl"] > 1
    from search.lookup import Lookup

    picked = Lookup.load(run).for_budget(budget)
    assert row["measured_latency_ms"] == picked.latency_ms_p50 and picked.latency_ms_p99 >= picked.latency_ms_p90
    with pytest.raises(FlextronError, match="below the smallest budget"):
        lookup(LookupConfig(run=str(run), budget_ms=min(out["lookup_budgets_ms"]) * 0.5))
    with pytest.raises(FlextronError, match="no rows measured in torch"):
        lookup(LookupConfig(run=str(run), budget_ms=budget, engine="torch"))
    gguf = run / "export" / "pick.gguf"
    info = export(ExportConfig(run=str(run), budget_ms=budget, format="gguf", out=str(gguf)))
    assert info["gguf_type"] == "q8_0" and info["config"] == row["config"]
    with pytest.raises(FlextronError, match="measured in llama.cpp with q8_0"):
        export(ExportConfig(run=str(run), budget_ms=budget, format="gguf", gguf_type="f16", out=str(run / "x.gguf")))

    import llama_cpp

    from flextron.spec import SubnetConfig

    elastic = ElasticModel.load(run / "elastic")
    ids = [5, 70, 33, 101, 200, 7, 9, 250]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=32, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    with torch.no_grad(), elastic.use(SubnetConfig.from_dict(row["config"])):
        ref = elastic.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[:len(ids)]) - ref).max() < 0.1  # q8_0 (f32 parity: test_gguf_export)
    llm.close()

"""search/lookup.py: the budget lookup built from verified picks, and the chain verify → lookup → report → export."""

import json

import pandas as pd
import pytest
from search_helpers import _budget, _results

from flextron.errors import FlextronError


def test_verify_lookup_report_and_budget_export(fitted, tmp_path, monkeypatch):
    """Verified on the known-latency timer (tests/known_latency.py), like the profile the budgets come
    from: which picks measure within their budgets never depends on the machine's load."""
    from known_latency import KnownLatency

    from flextron.elastic import ElasticModel
    from flextron.hf_export import load_subnet
    from reports.build import ReportConfig, build_report
    from search.export import ExportConfig, export
    from search.lookup import Lookup
    from search.optuna_search import SearchConfig, search
    from search.verify import VerifyConfig, verify

    known = KnownLatency().install(monkeypatch)
    budgets = tuple(_budget(fitted, f) for f in (0.5, 0.9))
    search(SearchConfig(run=str(fitted), budget_ms=budgets, trials=4, eval_windows=2, eval_seq_len=32))
    v = verify(VerifyConfig(run=str(fitted), rounds=2, reps=2, warmup=1))
    assert v["verified"] == 2 and v["within_budget"] == 2  # the latency model predicts the known timer exactly
    # every budget has its pick within: the uniform fallbacks are not measured (--uniform needed; only a
    # search candidate that is itself uniform is, as a pick or a rung), and the lookup serves the picks
    spec_ = ElasticModel.load(fitted / "elastic").spec
    n_uniform = len(spec_.uniform_configs())
    from flextron.spec import SubnetConfig

    candidates = {SubnetConfig.from_json(c).key for c in pd.read_parquet(_results(fitted) / "trials.parquet")["config"]}
    candidates.add(spec_.full().key)
    assert v["uniform_measured"] < n_uniform
    assert set(pd.read_parquet(fitted / "verify" / "uniform.parquet")["config_key"]) <= candidates
    assert export(ExportConfig(run=str(fitted), lookup=True))["rows"] == 2
    verified = {json.dumps(json.loads(c), sort_keys=True)
                for c in pd.read_parquet(fitted / "verify" / "verified.parquet")["config"]}
    served = json.loads((fitted / "export" / "lookup.json").read_text())["rows"]
    assert {json.dumps(r["config"], sort_keys=True) for r in served} <= verified
    v = verify(VerifyConfig(run=str(fitted), rounds=2, reps=2, warmup=1, uniform="all"))
    assert v["within_budget"] == 2 and v["uniform_measured"] == n_uniform
    ver = pd.read_parquet(fitted / "verify" / "verified.parquet")
    assert set(ver["weights"]) == {"elastic"}
    assert {"predicted_latency_ms", "measured_latency_ms", "within_budget"} <= set(ver.columns)
    uni = pd.read_parquet(fitted / "verify" / "uniform.parquet")  # fallbacks measured in the same session
    # every fallback measured within a budget has its loss on the search's setting, searched or not
    from search.quality import read_quality_cache

    setting = json.loads((_results(fitted) / "best.json").read_text())["quality_setting"]
    losses = read_quality_cache(fitted / "search" / "quality_cache.jsonl", setting)
    limit = ver["limit_frac"].max()
    assert set(uni[uni["ratio_to_full_hi"] <= limit]["config_key"]) <= set(losses)
    spec = json.loads((fitted / "elastic" / "elastic_spec.json").read_text())
    assert (
        len(uni) == len(spec["mlp_widths"][0]) * len(spec["head_counts"][0]) and (uni["measured_latency_ms"] > 0).all()
    )
    from flextron.spec import SubnetConfig

    assert [round(known.e2e_ms(SubnetConfig.from_json(c)), 6) for c in uni["config"]] == [
        round(ms, 6) for ms in uni["measured_latency_ms"]]
    s = export(ExportConfig(run=str(fitted), lookup=True))
    rows = json.loads((fitted / "export" / "lookup.json").read_text())["rows"]
    assert s["rows"] == len(rows) >= 1
    assert (fitted / "export" / "lookup.csv").is_file()
    ppl = [r["ppl"] for r in sorted(rows, key=lambda r: r["budget_ms"])]
    assert all(a >= b for a, b in zip(ppl, ppl[1:]))  # more budget never worse
    assert all(r["ratio_hi"] <= r["budget_frac"] for r in rows)  # compliant with confidence, in the same rounds
    assert all(r["reference_full_ms"] > 0 and r["latency_ms_p90"] >= r["latency_ms_p50"] for r in rows)
    measured_now = dict(zip(uni["config"].map(lambda c: json.dumps(json.loads(c))), uni["measured_latency_ms"]))
    for r in rows:
        if r["source"] == "uniform":  # a fallback, or a search pick that was a uniform seed: same-session timing
            assert r["measured_latency_ms"] == measured_now[json.dumps(r["config"])]
        if r["predicted_latency_ms"] is None:  # only fallbacks were never predicted
            assert r["source"] == "uniform"
    look = Lookup.load(fitted)
    assert sorted(r["budget_ms"] for r in rows) == sorted(budgets)  # the budgets as searched, not re-expressed
    for b in budgets:  # the exact ms a search was asked for is looked up at that ms
        assert look.for_budget(b).budget_ms == b
    assert all(r["measured_full_ms"] > 0 for r in rows)  # verify's own full model, beside the searched reference
    top = max(r["budget_ms"] for r in rows)
    assert look.for_budget(top * 10).budget_ms == top
    with pytest.raises(FlextronError, match="below the smallest budget"):
        look.for_budget(0.0)
    out = export(ExportConfig(run=str(fitted), budget_ms=top, out=str(tmp_path / "sub")))
    assert load_subnet(tmp_path / "sub") is not None and out["params"] > 0
    r = build_report(ReportConfig(run=str(fitted)))
    html = (fitted / "reports" / "index.html").read_text()
    assert "Pareto frontier, " in html  # the frontier figure's caption, not only the section title
    assert len(r["plots"]) >= 4
    assert (
        "held-out" in (fitted / "reports" / "summary.md").read_text().lower()
        or "Latency model" in (fitted / "reports" / "summary.md").read_text()
    )
    # weights replaced since the lookup was built (what `flextron train --restart` does to trained/):
    lookup = fitted / "export" / "lookup.json"
    d = json.loads(lookup.read_text())
    assert d["weights_tag"] == "elastic"
    lookup.write_text(json.dumps({**d, "weights": "trained", "weights_tag": "trained-00000000"}))
    with pytest.raises(FlextronError, match="replaced or removed since.*flextron verify.*--lookup"):
        Lookup.load(fitted)
    lookup.write_text(json.dumps(d))


def test_nothing_worse_than_the_worst_uniform_config_is_served():
    """The lookup's floor is the worst loss among the uniform configs evaluated (verify evaluates the
    smallest one), not the worst of everything ever cached: a verified pick worse than it never serves,
    however bad some other cached config was."""
    from flextron.spec import ElasticSpec
    from search.lookup import build_rows, uniform_losses
    base = dict(regime="decode:b1:ctx8:float32:eager", quantile="p50", weights="elastic", device_name="cpu",
                budget_ms=5.0, reference_full_ms=10.0, measured_full_ms=10.0, predicted_latency_ms=4.0,
                measured_latency_ms=4.0, latency_ms_p50=4.0, latency_ms_p90=4.5, latency_ms_p99=5.0, ratio=0.4,
                ratio_hi=0.45, limit_frac=0.5)
    bad = {**base, "budget_frac": 0.5, "config": json.dumps({"mlp_width": [192, 384], "heads": [3, 3], "skip": [1]}),
           "loss": 9.0, "source": "knapsack"}
    good = {**base, "budget_frac": 0.6, "budget_ms": 6.0, "limit_frac": 0.6, "ratio": 0.55, "ratio_hi": 0.58,
            "config": json.dumps({"mlp_width": [384, 384], "heads": [6, 3]}), "loss": 4.0, "source": "knapsack"}
    verified = pd.DataFrame([bad, good])
    spec = ElasticSpec(family="llama", num_layers=2, hidden_size=64, intermediate_size=384, num_heads=6,
                       num_kv_heads=6, head_dim=8, vocab_size=32, mlp_widths=((192, 384),) * 2,
                       head_counts=((3, 6),) * 2)
    cached = {"m192.192-h3.3": 8.0, "m192.384-h3.6": 50.0, "m0.192-h0.3": 60.0}  # only the first is uniform
    losses = {"decode:b1:ctx8:float32:eager": uniform_losses(cached, spec)}
    assert losses["decode:b1:ctx8:float32:eager"] == {"m192.192-h3.3": 8.0}
    rows = build_rows(verified, pd.DataFrame(), losses)
    assert [r["budget_frac"] for r in rows] == [0.6] and rows[0]["ppl"] == pytest.approx(__import__("math").exp(4.0))

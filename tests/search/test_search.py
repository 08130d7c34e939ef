import json
import multiprocessing as mp

import pandas as pd
import pytest

from flextron.errors import FlextronError


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("search") / "run", "prefill:b1:s64", 8)


def _budget(run, frac):
    from flextron.elastic import ElasticModel
    from profiler.latency_model import LatencyModels
    from search.optuna_search import feasible_range

    m = LatencyModels.load(run)
    spec = ElasticModel.load(run / "elastic").spec
    lo, hi = feasible_range(m.get(m.resolve(None)), spec)
    return lo + frac * (hi - lo)


def test_search_space_is_ordinal_and_round_trips_configs(tiny_run):
    """Each layer's choice is an integer index (0 = narrowest); a config enqueued as parameters is
    the config the trial suggests back."""
    import random

    import optuna

    from flextron.elastic import ElasticModel
    from search.optuna_search import config_params, suggest_config

    spec = ElasticModel.load(tiny_run / "elastic").spec
    for cfg in [spec.smallest(), spec.full()] + [spec.random_config(random.Random(i)) for i in range(5)]:
        params = config_params(cfg, spec)
        assert all(isinstance(v, int) for v in params.values())
        assert params["mlp_idx_0"] == spec.mlp_widths[0].index(cfg.mlp_width[0])
        assert suggest_config(optuna.trial.FixedTrial(params), spec) == cfg


def test_search_never_evaluates_infeasible_configs_and_resumes(fitted):
    from search.optuna_search import SearchConfig, search

    b = _budget(fitted, 0.4)
    s = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=6, eval_windows=2, eval_seq_len=32))
    trials = pd.read_parquet(fitted / "search" / "trials.parquet")
    ev = trials[trials["evaluated"]]
    assert len(ev) == 6 and (ev["predicted_latency_ms"] <= b).all()
    assert (trials[~trials["evaluated"]]["predicted_latency_ms"] > b).all()
    assert s["quality_evaluations"] <= 6  # cached configs are not evaluated twice
    # a second call on the same storage resumes: nothing more to do at the same trial count
    s2 = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=6, eval_windows=2, eval_seq_len=32))
    assert s2["quality_evaluations"] == 0 and s2["evaluated_trials"] == 6
    s3 = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=8, eval_windows=2, eval_seq_len=32))
    assert s3["evaluated_trials"] == 8


def test_budget_below_smallest_names_the_feasible_range(fitted):
    from search.optuna_search import SearchConfig, search

    with pytest.raises(FlextronError, match="feasible budgets run from"):
        search(SearchConfig(run=str(fitted), budget_ms=(1e-6,), trials=2))
    with pytest.raises(FlextronError, match="cannot open Optuna storage"):
        search(SearchConfig(run=str(fitted), budget_ms=(1.0,), storage="postgresql://nobody@127.0.0.1:1/x"))
    with pytest.raises(FlextronError, match="was not profiled"):
        search(SearchConfig(run=str(fitted), regime="decode:b1:ctx32", budget_ms=(1.0,)))


def test_verify_lookup_report_and_budget_export(fitted, tmp_path):
    from flextron.export import load_subnet
    from reports.build import ReportConfig, build_report
    from search.export import ExportConfig, export
    from search.lookup import Lookup
    from search.optuna_search import SearchConfig, search
    from search.verify import VerifyConfig, verify

    budgets = tuple(_budget(fitted, f) * 3 for f in (0.5, 0.9))  # generous: CPU timing noise in CI
    search(SearchConfig(run=str(fitted), budget_ms=budgets, trials=4, eval_windows=2, eval_seq_len=32))
    v = verify(VerifyConfig(run=str(fitted), min_reps=3, min_time_ms=5))
    assert v["verified"] >= 2
    ver = pd.read_parquet(fitted / "verify" / "verified.parquet")
    assert {"predicted_latency_ms", "measured_latency_ms", "within_budget"} <= set(ver.columns)
    uni = pd.read_parquet(fitted / "verify" / "uniform.parquet")  # fallbacks measured in the same session
    spec = json.loads((fitted / "elastic" / "elastic_spec.json").read_text())
    assert len(uni) == len(spec["mlp_widths"][0]) * len(spec["head_counts"][0]) and (uni["measured_latency_ms"] > 0).all()
    s = export(ExportConfig(run=str(fitted), lookup=True))
    rows = json.loads((fitted / "export" / "lookup.json").read_text())["rows"]
    assert s["rows"] == len(rows) >= 1
    assert (fitted / "export" / "lookup.csv").is_file()
    ppl = [r["ppl"] for r in sorted(rows, key=lambda r: r["budget_ms"])]
    assert all(a >= b for a, b in zip(ppl, ppl[1:]))  # more budget never worse
    assert all(r["measured_latency_ms"] <= r["budget_ms"] for r in rows)
    measured_now = dict(zip(uni["config"].map(lambda c: json.dumps(json.loads(c))), uni["measured_latency_ms"]))
    for r in rows:
        if r["source"] == "uniform":  # a fallback, or a search pick that was a uniform seed: same-session timing
            assert r["measured_latency_ms"] == measured_now[json.dumps(r["config"])]
        if r["predicted_latency_ms"] is None:  # only fallbacks were never predicted
            assert r["source"] == "uniform"
    look = Lookup.load(fitted)
    top = max(r["budget_ms"] for r in rows)
    assert look.for_budget(top * 10).budget_ms == top
    with pytest.raises(FlextronError, match="below the smallest budget"):
        look.for_budget(0.0)
    out = export(ExportConfig(run=str(fitted), budget_ms=top, out=str(tmp_path / "sub")))
    assert load_subnet(tmp_path / "sub") is not None and out["params"] > 0
    r = build_report(ReportConfig(run=str(fitted)))
    html = (fitted / "reports" / "index.html").read_text()
    assert "Pareto" in html or "pareto" in html
    assert len(r["plots"]) >= 4
    assert "held-out" in (fitted / "reports" / "summary.md").read_text().lower() or "Latency model" in (fitted / "reports" / "summary.md").read_text()


def _worker(args):
    run, storage, b = args
    from search.optuna_search import SearchConfig, search

    return search(SearchConfig(run=run, budget_ms=(b,), trials=10, eval_windows=2, eval_seq_len=32,
                               storage=storage, study_prefix="shared"))


def test_four_workers_share_one_study(fitted, tmp_path):
    import optuna

    storage = str(tmp_path / "journal.log")
    b = _budget(fitted, 0.8)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_worker, [(str(fitted), storage, b)] * 4)
    from optuna.storages.journal import JournalFileBackend

    st = optuna.storages.JournalStorage(JournalFileBackend(storage))
    study = optuna.load_study(study_name=f"shared|budget={b:.6g}", storage=st)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))  # no duplicated trials
    assert sorted(numbers) == list(range(len(numbers)))  # none lost
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(study.trials)  # nothing left running
    assert sum(1 for t in complete if t.user_attrs.get("evaluated")) >= 10

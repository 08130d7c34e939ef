import json
import multiprocessing as mp

import pandas as pd
import pytest

from flextron.errors import FlextronError


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("search") / "run", "prefill:b1:s64", 8)


def _results(run, weights="elastic"):
    from profiler.latency_model import LatencyModels
    from search.optuna_search import results_dir

    return results_dir(run, LatencyModels.load(run).resolve(None), weights)


def _budget(run, frac):
    from flextron.elastic import ElasticModel
    from profiler.latency_model import LatencyModels
    from search.optuna_search import feasible_range

    m = LatencyModels.load(run)
    spec = ElasticModel.load(run / "elastic").spec
    lo, hi = feasible_range(m.get(m.resolve(None)), spec)
    return lo + frac * max(hi - lo, 0.5 * lo)  # distinct budgets even when a noisy profile predicts a flat range


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
    s = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=6, eval_windows=2, eval_seq_len=32, margin=0.0))
    trials = pd.read_parquet(_results(fitted) / "trials.parquet")
    ev = trials[trials["evaluated"]]
    assert ev["config"].nunique() == 6 and (ev["predicted_latency_ms"] <= b).all()
    assert (trials[~trials["evaluated"]]["predicted_latency_ms"] > b).all()
    assert s["quality_evaluations"] <= 6  # cached configs are not evaluated twice
    # a second call on the same storage resumes: nothing more to do at the same trial count
    s2 = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=6, eval_windows=2, eval_seq_len=32, margin=0.0))
    assert s2["quality_evaluations"] == 0 and s2["per_budget"][0]["evaluated"] == 6
    s3 = search(SearchConfig(run=str(fitted), budget_ms=(b,), trials=8, eval_windows=2, eval_seq_len=32, margin=0.0))
    assert s3["per_budget"][0]["evaluated"] == 8 and s3["per_budget"][0]["stop"] == "done"


def test_budget_below_smallest_names_the_feasible_range(fitted):
    from search.optuna_search import SearchConfig, search

    with pytest.raises(FlextronError, match="feasible p50 budgets run from"):
        search(SearchConfig(run=str(fitted), budget_ms=(1e-6,), trials=2))
    with pytest.raises(FlextronError, match="cannot open Optuna storage"):
        search(SearchConfig(run=str(fitted), budget_ms=(1.0,), storage="postgresql://nobody@127.0.0.1:1/x"))
    with pytest.raises(FlextronError, match="was not profiled"):
        search(SearchConfig(run=str(fitted), regime="decode:b1:ctx32", budget_ms=(1.0,)))


def test_verify_lookup_report_and_budget_export(fitted, tmp_path):
    from flextron.hf_export import load_subnet
    from reports.build import ReportConfig, build_report
    from search.export import ExportConfig, export
    from search.lookup import Lookup
    from search.optuna_search import SearchConfig, search
    from search.verify import VerifyConfig, verify

    budgets = tuple(_budget(fitted, f) * 3 for f in (0.5, 0.9))  # generous: CPU timing noise in CI
    search(SearchConfig(run=str(fitted), budget_ms=budgets, trials=4, eval_windows=2, eval_seq_len=32))
    v = verify(VerifyConfig(run=str(fitted), rounds=2, reps=2, warmup=1))
    assert v["verified"] >= 2
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
    assert len(uni) == len(spec["mlp_widths"][0]) * len(spec["head_counts"][0]) and (uni["measured_latency_ms"] > 0).all()
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
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)  # FAIL: a config another worker had
    assert all(t.state in done for t in study.trials)  # nothing left running
    evaluated = {t.user_attrs["config"] for t in study.trials
                 if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("evaluated")}
    assert len(evaluated) == 10  # distinct configs: repeats are not counted and workers never overshoot


# ---- run-directory integrity -------------------------------------------------------------------------
@pytest.fixture
def run_copy(fitted, tmp_path):
    import shutil

    shutil.copytree(fitted, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "search", ignore_errors=True)
    shutil.rmtree(tmp_path / "run" / "verify", ignore_errors=True)
    return tmp_path / "run"


def _search(run, **kw):
    from search.optuna_search import SearchConfig, search

    return search(SearchConfig(run=str(run), **{"trials": 3, "eval_windows": 2, "eval_seq_len": 32, **kw}))


def test_trained_and_one_shot_studies_never_mix(run_copy):
    """One-shot after trained: each result folder holds only its own weights' studies and losses."""
    import shutil

    b = _budget(run_copy, 0.6)
    shutil.copytree(run_copy / "elastic", run_copy / "trained")  # stands in for `flextron train`'s output
    _search(run_copy, budget_ms=(b,), weights="trained")
    _search(run_copy, budget_ms=(b,), weights="elastic")
    one_shot = pd.read_parquet(_results(run_copy, "elastic") / "trials.parquet")
    trained = pd.read_parquet(_results(run_copy, "trained") / "trials.parquet")
    assert len(one_shot) and len(trained)
    assert not one_shot["study"].str.contains("trained").any()
    assert trained["study"].str.contains("trained").all()
    assert json.loads((_results(run_copy, "elastic") / "best.json").read_text())["weights"] == "elastic"
    assert set(one_shot["weights"]) == {"elastic"} and set(trained["weights"]) == {"trained"}


def test_another_evaluation_setting_is_refused_not_mixed(run_copy):
    b = _budget(run_copy, 0.6)
    _search(run_copy, budget_ms=(b,))
    before = (_results(run_copy) / "best.json").read_bytes()
    with pytest.raises(FlextronError, match="--eval-windows.*--restart"):
        _search(run_copy, budget_ms=(b,), eval_windows=3)
    assert (_results(run_copy) / "best.json").read_bytes() == before
    s = _search(run_copy, budget_ms=(b,), eval_windows=3, restart=True)
    best = json.loads((_results(run_copy) / "best.json").read_text())
    assert best["quality_setting"].endswith("3x32") and s["per_budget"][0]["evaluated"] == 3
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    assert trials["study"].str.contains("3x32").all()  # the 2-window study is gone from the table


def test_each_search_keeps_earlier_picks_across_budgets_and_storages(run_copy):
    b1, b2, b3 = (_budget(run_copy, f) for f in (0.5, 0.7, 0.9))
    _search(run_copy, budget_ms=(b1,))
    _search(run_copy, budget_ms=(b2,))
    _search(run_copy, budget_ms=(b3,), storage=str(run_copy / "journal.log"))
    best = json.loads((_results(run_copy) / "best.json").read_text())
    assert sorted(round(b["budget_ms"], 6) for b in best["best"]) == sorted(round(b, 6) for b in (b1, b2, b3))
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    assert trials["storage"].nunique() == 2


def test_budgets_record_their_reference_and_bad_budgets_are_refused(run_copy):
    s = _search(run_copy, budget_frac=(0.9,))
    best = json.loads((_results(run_copy) / "best.json").read_text())["best"][0]
    assert best["budget_frac"] == 0.9 and best["budget_ms"] == pytest.approx(0.9 * best["reference_full_ms"], abs=1e-3)
    assert s["per_budget"][0]["budget_frac"] == 0.9
    before = (_results(run_copy) / "best.json").read_bytes()
    for bad, msg in [({"budget_ms": (float("inf"),)}, "--budget-ms must be a finite number"),
                     ({"budget_ms": (-1.0,)}, "--budget-ms must be >"), ({"eval_windows": 0}, "--eval-windows must be >= 1"),
                     ({"budget_frac": (float("nan"),)}, "--budget-frac must be a finite"),
                     ({"budget_ms": (1.0,), "device": "gpu"}, "--device must be cpu")]:
        with pytest.raises(FlextronError, match=msg):
            _search(run_copy, **bad)
    assert (_results(run_copy) / "best.json").read_bytes() == before


def test_out_of_proposals_is_reported(run_copy, capsys, monkeypatch):
    """Only two configs fit: the search stops after its capped proposals and says so."""
    import numpy as np

    from flextron.elastic import ElasticModel
    from profiler.latency_model import LatencyModel, encode

    spec = ElasticModel.load(run_copy / "elastic").spec
    fits = encode([spec.smallest(), spec.uniform(0.25, 0.5)])
    monkeypatch.setattr(LatencyModel, "predict",
                        lambda self, X: np.where([any((x == f).all() for f in fits) for x in np.asarray(X)], 1.0, 2.0))
    monkeypatch.setattr(LatencyModel, "range_ms", lambda self, spec: (1.0, 2.0))
    s = _search(run_copy, budget_ms=(1.5,), trials=6)
    r = s["per_budget"][0]
    assert r["evaluated"] < 6 and r["stop"].startswith("ran out of proposals")
    assert "stopped early: ran out of proposals" in capsys.readouterr().err


def test_search_reads_the_runs_corpus(run_copy):
    _search(run_copy, budget_ms=(_budget(run_copy, 0.8),), corpus="pydoc")
    assert ":pydoc:" in json.loads((_results(run_copy) / "best.json").read_text())["quality_setting"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_device_is_a_clear_error(run_copy):
    from flextron.cli import main

    for argv in (["search", "--run", str(run_copy), "--budget-ms", "1", "--device", "cuda:7"],
                 ["eval", "--run", str(run_copy), "--device", "cuda:7"],
                 ["verify", "--run", str(run_copy), "--device", "cuda:7"]):
        if argv[0] == "verify":
            _search(run_copy, budget_ms=(_budget(run_copy, 0.8),))
        assert main(argv) == 2


def _fake_latency(monkeypatch, spec, samples=None):
    """Timer.measure returns a latency proportional to a config's parameters (deterministic), or
    `samples(fraction_of_full_params, call_number)` when given."""
    import itertools

    from profiler import timer as timer_mod
    from profiler.sweep import RegimeBench
    from profiler.timer import Timing

    full = spec.full().param_count(spec)
    real_forward = RegimeBench.forward_fn
    calls = itertools.count()
    samples = samples or (lambda frac, n: [10.0 * frac] * 3)
    monkeypatch.setattr(RegimeBench, "forward_fn", lambda self, sub: _Tagged(real_forward(self, sub), sub.param_count(spec)))
    monkeypatch.setattr(timer_mod.Timer, "measure", lambda self, fn: Timing(samples(fn.params / full, next(calls))))


class _Tagged:
    def __init__(self, fn, params):
        self.fn, self.params = fn, params

    def __call__(self):
        return self.fn()


def _one_pick(run, spec, pick, frac):
    """Make `pick` the only search result, at budget fraction `frac` of a 10 ms full model."""
    folder = _results(run)
    best = json.loads((folder / "best.json").read_text())
    best["best"] = [{**best["best"][0], "budget_ms": 10.0 * frac, "budget_frac": frac, "reference_full_ms": 10.0,
                     "config": pick.to_dict(), "loss": 0.0}]
    (folder / "best.json").write_text(json.dumps(best))
    (folder / "trials.parquet").unlink()  # no replacement candidates


def test_verify_measures_more_rounds_inside_the_noise_band_and_never_accepts_a_straddle(run_copy, monkeypatch):
    from flextron.elastic import ElasticModel
    from search.verify import VerifyConfig, verify

    spec = ElasticModel.load(run_copy / "elastic").spec
    pick = spec.uniform(0.5)
    _search(run_copy, budget_ms=(_budget(run_copy, 0.9),))
    frac = pick.param_count(spec) / spec.full().param_count(spec)
    _one_pick(run_copy, spec, pick, frac)
    # the pick alternates 10% below and above its budget from call to call; everything else is steady
    _fake_latency(monkeypatch, spec, lambda f, n: [10.0 * f * (0.9 if n % 2 else 1.1) if abs(f - frac) < 1e-9 else 10.0 * f] * 3)
    verify(VerifyConfig(run=str(run_copy), rounds=2, max_rounds=6, reps=1, warmup=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet").iloc[0]
    assert ver["verdict"] == "uncertain" and not ver["within_budget"] and ver["rounds"] == 6
    assert ver["ratio_lo"] < frac < ver["ratio_hi"]
    from search.export import ExportConfig, export

    try:  # a uniform fallback whose loss is known may serve the budget; the straddling pick never does
        export(ExportConfig(run=str(run_copy), lookup=True))
    except FlextronError as e:
        assert "no verified config met its budget" in str(e)
    else:
        rows = json.loads((run_copy / "export" / "lookup.json").read_text())["rows"]
        assert all(r["config"] != pick.to_dict() and r["ratio_hi"] <= r["budget_frac"] for r in rows)


@pytest.mark.parametrize("quantile, verdict", [("p50", "within"), ("p90", "over")])
def test_quantile_budgets_use_the_tail_samples(run_copy, monkeypatch, quantile, verdict):
    """A pick whose median step fits but whose every fifth step is slow meets a p50 budget, not a p90 one."""
    from flextron.elastic import ElasticModel
    from search.verify import VerifyConfig, verify

    spec = ElasticModel.load(run_copy / "elastic").spec
    pick = spec.uniform(0.5)
    _search(run_copy, budget_ms=(_budget(run_copy, 0.9),))
    frac = pick.param_count(spec) / spec.full().param_count(spec)
    _one_pick(run_copy, spec, pick, frac * 1.05)
    _fake_latency(monkeypatch, spec, lambda f, n: [10.0 * f] * 4 + [10.0 * f * (2.0 if abs(f - frac) < 1e-9 else 1.0)])
    verify(VerifyConfig(run=str(run_copy), rounds=4, reps=5, warmup=0, quantile=quantile))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet").iloc[0]
    assert ver["verdict"] == verdict and ver["quantile"] == quantile


def test_verify_replaces_a_miss_with_a_config_that_fits(run_copy, monkeypatch):
    """A pick measured over its budget is replaced by the next best evaluated config of the same
    budget, regime and weights that measures within it."""
    from flextron.elastic import ElasticModel
    from search.verify import VerifyConfig, verify

    spec = ElasticModel.load(run_copy / "elastic").spec
    _search(run_copy, budget_ms=(_budget(run_copy, 0.95),), trials=6)
    _fake_latency(monkeypatch, spec)
    folder = _results(run_copy)
    trials = pd.read_parquet(folder / "trials.parquet")
    ev = trials[trials["evaluated"]].drop_duplicates("config")
    assert len(ev) >= 3
    params = {c: spec.validate(__import__("flextron.spec", fromlist=["SubnetConfig"]).SubnetConfig.from_json(c)).param_count(spec)
              for c in ev["config"]}
    full = spec.full().param_count(spec)
    best = json.loads((folder / "best.json").read_text())
    pick = max(params, key=params.get)  # make the largest evaluated config the pick, and let it miss
    budget = 10.0 * sorted(params.values())[-2] / full  # the second largest fits exactly
    trials.loc[trials["evaluated"], "budget_ms"] = budget
    trials.to_parquet(folder / "trials.parquet", index=False)
    best["best"] = [{**best["best"][0], "budget_ms": budget, "budget_frac": budget / 10.0, "reference_full_ms": 10.0,
                     "config": json.loads(pick), "loss": 0.0}]
    (folder / "best.json").write_text(json.dumps(best))
    v = verify(VerifyConfig(run=str(run_copy), rounds=2, reps=1, warmup=0))
    ver = pd.read_parquet(run_copy / "verify" / "verified.parquet")
    assert v["replaced"] == 1 and bool(ver["replaced"].iloc[0]) and bool(ver["within_budget"].iloc[0])
    assert ver["config"].iloc[0] != pick and ver["replacements_tried"].iloc[0] >= 1
    assert ver["measured_latency_ms"].iloc[0] <= budget and ver["verdict"].iloc[0] == "within"


def test_verify_bad_flags_keep_earlier_results(run_copy):
    from search.verify import VerifyConfig, verify

    _search(run_copy, budget_ms=(_budget(run_copy, 0.9) * 3,))
    verify(VerifyConfig(run=str(run_copy), rounds=2, reps=2, warmup=1))
    before = (run_copy / "verify" / "verified.parquet").read_bytes()
    for kw, msg in [({"rounds": 1}, "--rounds must be at least 2"), ({"reps": 0}, "--reps must be at least 1"),
                    ({"tolerance": float("nan")}, "--tolerance"), ({"quantile": "p95"}, "--quantile must be one of"),
                    ({"max_rounds": 3, "rounds": 4}, "--max-rounds must be >= 4"), ({"device": "gpu"}, "--device must be cpu")]:
        with pytest.raises(FlextronError, match=msg):
            verify(VerifyConfig(run=str(run_copy), **kw))
    assert (run_copy / "verify" / "verified.parquet").read_bytes() == before


def test_two_regimes_keep_their_own_results(tiny_run, tmp_path):
    """Each regime's trials, picks and replacements stay its own; verify covers both."""
    import shutil

    from flextron.elastic import ElasticModel
    from profiler.latency_model import FitConfig, fit
    from profiler.sweep import ProfileConfig, run_sweep
    from search.optuna_search import results_dir
    from search.verify import VerifyConfig, verify

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    regimes = ("decode:b1:ctx16", "prefill:b1:s16")
    run_sweep(ElasticModel.load(run / "elastic"), run / "profile",
              ProfileConfig(regime=regimes, min_reps=2, min_time_ms=1, warmup=1, e2e_random=6, rounds=2, reps=2))
    fit(FitConfig(run=str(run)))
    keys = {}
    for r in regimes:
        keys[r] = _search(run, regime=r, budget_frac=(5.0,))["regime"]
    for r, key in keys.items():
        trials = pd.read_parquet(results_dir(run, key, "elastic") / "trials.parquet")
        assert set(trials["regime"]) == {key} and trials["study"].str.contains(key, regex=False).all()
    verify(VerifyConfig(run=str(run), rounds=2, reps=1, warmup=0))
    ver = pd.read_parquet(run / "verify" / "verified.parquet")
    assert sorted(ver["regime"]) == sorted(keys.values())
    uni = pd.read_parquet(run / "verify" / "uniform.parquet")
    assert set(uni["regime"]) == set(keys.values())


def test_picks_of_replaced_trained_weights_are_never_verified_or_resumed(run_copy, capsys):
    """`flextron train` rewrote trained/ after a search: its picks, losses and studies are stale."""
    import os
    import shutil

    from search.verify import VerifyConfig, verify

    shutil.copytree(run_copy / "elastic", run_copy / "trained")
    b = _budget(run_copy, 2.0)
    _search(run_copy, budget_ms=(b,), weights="trained")
    for f in (run_copy / "trained").glob("*.safetensors"):  # as a new training run's weights would be
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(FlextronError, match="no evaluated picks of the current weights"):
        verify(VerifyConfig(run=str(run_copy), rounds=2, reps=1, warmup=0))
    assert "replaced since" in capsys.readouterr().err
    with pytest.raises(FlextronError, match="re-trained weights"):
        _search(run_copy, budget_ms=(b,), weights="trained")


def test_search_aims_below_each_budget_by_the_models_uncertainty(run_copy):
    """Picks predicted right at a budget are a coin toss when measured: the search keeps a margin,
    by default the latency model's held-out error or the profile's noise floor, whichever is larger."""
    from search.optuna_search import search_margin

    b = _budget(run_copy, 0.8)
    s = _search(run_copy, budget_ms=(b,), trials=4, margin=0.1)
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    ev = trials[trials["evaluated"]]
    assert s["margin"] == 0.1 and (ev["predicted_latency_ms"] <= 0.9 * b + 1e-9).all()
    assert ((trials[~trials["evaluated"]]["predicted_latency_ms"] > 0.9 * b)).all()
    m = json.loads((run_copy / "latency_model" / "metrics.json").read_text())
    key = next(iter(m))
    expected = min(0.1, max(m[key]["heldout"]["mape_pct"], m[key]["ratio_noise_floor_pct"] or 0) / 100)
    assert search_margin(run_copy, key) == pytest.approx(expected)
    with pytest.raises(FlextronError, match="--margin must be -1"):
        _search(run_copy, budget_ms=(b,), margin=-0.5)

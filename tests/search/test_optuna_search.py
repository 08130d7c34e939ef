"""search/optuna_search.py: Optuna search under budgets, resumable, shared storages, never mixing settings."""

import json
import multiprocessing as mp

import pandas as pd
import pytest
from search_helpers import _budget, _results, _search, _shared_worker

from flextron.errors import FlextronError


def test_search_space_is_ordinal_and_round_trips_configs(tiny_run):
    """Each layer's choice is an integer index (0 = narrowest); a config enqueued as parameters is
    the config the trial suggests back."""
    import random

    import optuna

    from flextron.elastic import ElasticModel
    from search.study import config_params, suggest_config

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

def test_four_workers_share_one_study(fitted, tmp_path):
    import optuna

    storage = str(tmp_path / "journal.log")
    b = _budget(fitted, 0.8)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(_shared_worker, [(str(fitted), storage, b, "shared", 10)] * 4)
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

def test_a_dead_workers_claim_is_free_at_once_and_a_resumed_search_finishes(fitted, tmp_path):
    """A search killed mid-evaluation leaves its trial RUNNING; on this host its claim is stale as soon
    as the process is gone (not after CLAIM_TTL_S), so a resumed search evaluates every asked config."""
    import socket
    import subprocess
    import sys
    import time

    import optuna
    from optuna.storages.journal import JournalFileBackend

    from search.optuna_search import SearchConfig, search
    from search.study import claim_is_live, study_progress

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, now = socket.gethostname(), time.time()
    assert not claim_is_live({"claimed_at": now, "claimed_by": f"{host}:{dead.pid}"}, now)
    assert claim_is_live({"claimed_at": now, "claimed_by": f"{host}:{__import__('os').getpid()}"}, now)
    assert claim_is_live({"claimed_at": now, "claimed_by": f"elsewhere.example:{dead.pid}"}, now)  # TTL decides
    assert not claim_is_live({"claimed_at": now - 901, "claimed_by": f"elsewhere.example:{dead.pid}"}, now)

    storage = str(tmp_path / "journal.log")
    b = _budget(fitted, 0.8)
    cfg = dict(run=str(fitted), budget_ms=(b,), trials=4, eval_windows=2, eval_seq_len=32, storage=storage,
               study_prefix="killed")
    search(SearchConfig(**cfg))  # 4 evaluated; then a worker that died while evaluating a fifth
    st = optuna.storages.JournalStorage(JournalFileBackend(storage))
    study = optuna.load_study(study_name=f"killed|budget={b:.6g}", storage=st)
    t = study.ask()
    t.set_user_attr("config", "a config the dead worker was evaluating")
    t.set_user_attr("claimed_at", time.time())
    t.set_user_attr("claimed_by", f"{host}:{dead.pid}")
    assert study_progress(study)[1] == []
    s = search(SearchConfig(**{**cfg, "trials": 5}))
    assert s["per_budget"][0]["evaluated"] == 5 and s["per_budget"][0]["stop"] == "done"

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

def test_a_resume_under_another_margin_or_latency_model_is_refused(run_copy):
    """Which proposals were feasible came from the latency model and margin a study was searched with:
    a resume under another margin or a re-fitted model would mix two rules in one study, so it is refused."""
    import json

    b = _budget(run_copy, 0.6)
    _search(run_copy, budget_ms=(b,), margin=0.0)
    before = (_results(run_copy) / "best.json").read_bytes()
    with pytest.raises(FlextronError, match="search_margin.*--margin.*--restart"):
        _search(run_copy, budget_ms=(b,), margin=0.1)
    path = run_copy / "latency_model" / "latency_model.json"
    d = json.loads(path.read_text())
    for m in d["regimes"].values():
        m["fixed_ms"] = m.get("fixed_ms", 0.0) * 1.01 + 1e-6  # stands in for a re-fit on a new profile
    path.write_text(json.dumps(d))
    with pytest.raises(FlextronError, match="latency_model_id.*re-fitted.*--restart"):
        _search(run_copy, budget_ms=(b,), margin=0.0)
    assert (_results(run_copy) / "best.json").read_bytes() == before
    _search(run_copy, budget_ms=(b,), margin=0.0, restart=True)

def test_random_sampler_is_the_plain_baseline_and_the_frontier_is_latency_against_loss(run_copy):
    """`--sampler random` seeds nothing and still evaluates only configs that fit; `--frontier` searches
    latency and loss together (no budget) and its trials join the table and the Pareto front."""
    b = _budget(run_copy, 0.7)
    s = _search(run_copy, budget_ms=(b,), sampler="random", trials=4, margin=0.0)
    per = s["per_budget"][0]
    assert per["seeded"] == 0 and per["evaluated"] == 4 and per["stop"] == "done"
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    ev = trials[trials["evaluated"]]
    assert set(ev["source"]) <= {"search"} and (ev["predicted_latency_ms"] <= b + 1e-9).all()
    _search(run_copy, frontier=True, trials=5, restart=True)
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    frontier = trials[trials["study"].str.endswith("|frontier")]
    assert len(frontier) == 5 and frontier["evaluated"].all()
    pareto = pd.read_parquet(_results(run_copy) / "pareto.parquet")
    assert len(pareto) >= 1 and set(pareto["config"]) <= set(trials["config"])
    # a point of the front is beaten by no trial on both latency and loss
    for p in pareto.itertuples():
        assert not ((trials["predicted_latency_ms"] < p.predicted_latency_ms) & (trials["loss"] < p.loss)
                    & trials["evaluated"]).any()

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
    """A fraction is resolved against the full model measured in the profile (here the known-latency
    timer's, so the reference and the ms budget are known numbers) and the picks fit that ms budget."""
    from known_latency import KnownLatency

    from flextron.elastic import ElasticModel

    full_ms = KnownLatency().e2e_ms(ElasticModel.load(run_copy / "elastic").spec.full())
    s = _search(run_copy, budget_frac=(0.9,))
    best = json.loads((_results(run_copy) / "best.json").read_text())["best"]
    assert len(best) == 1 and best[0]["reference_full_ms"] == pytest.approx(full_ms, rel=1e-9)
    assert best[0]["budget_frac"] == 0.9 and best[0]["budget_ms"] == pytest.approx(0.9 * full_ms, rel=1e-9)
    assert best[0]["predicted_latency_ms"] <= best[0]["budget_ms"]
    assert s["reference_full_ms"] == pytest.approx(full_ms, rel=1e-9) and s["budgets_ms"] == [best[0]["budget_ms"]]
    assert s["per_budget"][0]["budget_frac"] == 0.9 and s["per_budget"][0]["evaluated"] == 3
    before = (_results(run_copy) / "best.json").read_bytes()
    for bad, msg in [
        ({"budget_ms": (float("inf"),)}, "--budget-ms must be a finite number"),
        ({"budget_ms": (-1.0,)}, "--budget-ms must be >"),
        ({"eval_windows": 0}, "--eval-windows must be >= 1"),
        ({"budget_frac": (float("nan"),)}, "--budget-frac must be a finite"),
        ({"budget_ms": (1.0,), "device": "gpu"}, "--device must be cpu"),
    ]:
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
    monkeypatch.setattr(
        LatencyModel,
        "predict",
        lambda self, X: np.where([any((x == f).all() for f in fits) for x in np.asarray(X)], 1.0, 2.0),
    )
    monkeypatch.setattr(LatencyModel, "range_ms", lambda self, spec: (1.0, 2.0))
    s = _search(run_copy, budget_ms=(1.5,), trials=6, max_asks_per_trial=3)
    r = s["per_budget"][0]
    assert r["evaluated"] < 6 and r["stop"].startswith("ran out of proposals") and r["asked_here"] == 18
    assert "stopped early: ran out of proposals" in capsys.readouterr().err


def test_search_reads_the_runs_corpus(run_copy):
    _search(run_copy, budget_ms=(_budget(run_copy, 0.8),), corpus="pydoc")
    assert ":pydoc@" in json.loads((_results(run_copy) / "best.json").read_text())["quality_setting"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_device_is_a_clear_error(run_copy):
    from flextron.cli import main

    for argv in (
        ["search", "--run", str(run_copy), "--budget-ms", "1", "--device", "cuda:7"],
        ["eval", "--run", str(run_copy), "--device", "cuda:7"],
        ["verify", "--run", str(run_copy), "--device", "cuda:7"],
    ):
        if argv[0] == "verify":
            _search(run_copy, budget_ms=(_budget(run_copy, 0.8),))
        assert main(argv) == 2


def test_two_regimes_keep_their_own_results(tiny_run, tmp_path, monkeypatch):
    """Each regime's trials, picks and replacements stay its own; verify covers both (profiled and
    verified on the known-latency timer: what fits a budget never depends on the machine's load)."""
    import shutil

    from known_latency import KnownLatency

    from flextron.elastic import ElasticModel
    from profiler.fit import FitConfig, fit
    from profiler.sweep import ProfileConfig, run_sweep
    from search.optuna_search import results_dir
    from search.verify import VerifyConfig, verify

    KnownLatency().install(monkeypatch)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    regimes = ("decode:b1:ctx16", "prefill:b1:s16")
    run_sweep(
        ElasticModel.load(run / "elastic"),
        run / "profile",
        ProfileConfig(
            run=str(run), regime=regimes, min_reps=2, min_time_ms=1, warmup=1, e2e_random=6, rounds=2, reps=2,
            max_rounds=2,
        ),
    )
    fit(FitConfig(run=str(run)))
    keys = {}
    for r in regimes:
        keys[r] = _search(run, regime=r, budget_frac=(5.0,))["regime"]
    for r, key in keys.items():
        trials = pd.read_parquet(results_dir(run, key, "elastic") / "trials.parquet")
        assert set(trials["regime"]) == {key} and trials["study"].str.contains(key, regex=False).all()
    verify(VerifyConfig(run=str(run), rounds=2, reps=1, warmup=0))
    ver = pd.read_parquet(run / "verify" / "verified.parquet")
    assert sorted(ver["regime"]) == sorted(keys.values()) and ver["within_budget"].all()  # 5x the full model
    uni = pd.read_parquet(run / "verify" / "uniform.parquet")
    assert set(uni["regime"]) == set(keys.values())


def test_search_aims_below_each_budget_by_the_models_uncertainty(run_copy):
    """Picks predicted right at a budget are a coin toss when measured: the search keeps a margin,
    by default the latency model's held-out error or the profile's noise floor, whichever is larger."""
    from search.optuna_search import search_margin

    b = _budget(run_copy, 0.8)
    s = _search(run_copy, budget_ms=(b,), trials=4, margin=0.1)
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    ev = trials[trials["evaluated"]]
    ladder = ev["source"].str.startswith("knapsack_stretch")  # the seeds between the margin and the budget
    assert s["margin"] == 0.1 and (ev[~ladder]["predicted_latency_ms"] <= 0.9 * b + 1e-9).all()
    assert (ev[ladder]["predicted_latency_ms"] <= b + 1e-9).all()
    assert (trials[~trials["evaluated"]]["predicted_latency_ms"] > 0.9 * b).all()
    # the default: the larger of the two, capped at 10% (pinned here: the known-latency profile has neither)
    path = run_copy / "latency_model" / "metrics.json"
    m = json.loads(path.read_text())
    key = next(iter(m))
    assert search_margin(run_copy, key) == 0.0
    for mape_pct, floor_pct, expected in [(3.0, 1.5, 0.03), (0.5, 2.0, 0.02), (0.5, None, 0.005), (30.0, 1.0, 0.1)]:
        m[key]["heldout"]["mape_pct"], m[key]["ratio_noise_floor_pct"] = mape_pct, floor_pct
        path.write_text(json.dumps(m))
        assert search_margin(run_copy, key) == pytest.approx(expected)
    with pytest.raises(FlextronError, match="--margin must be -1"):
        _search(run_copy, budget_ms=(b,), margin=-0.5)
    for bad in ({"max_asks_per_trial": 0}, {"nsga_population": 1}, {"max_asks_per_trial": 2.5}):
        with pytest.raises(FlextronError, match="--" + next(iter(bad)).replace("_", "-")):
            _search(run_copy, budget_ms=(b,), **bad)


def test_at_a_budget_random_proposals_almost_never_fit_the_search_evaluates_the_asked_number(run_copy):
    """Just above the fastest sub-networks (8 of the tiny model's thousands of configs fit) a random
    proposal seldom fits: the knapsack's seeds and repaired proposals still give the asked number of
    distinct evaluated configs, every one predicted within the budget, and no infeasible proposal
    is evaluated (counted on the raw trials)."""
    import itertools
    import random

    from flextron.elastic import ElasticModel
    from flextron.spec import SubnetConfig
    from profiler.latency_model import LatencyModels
    from search.optuna_search import SearchConfig, search

    spec = ElasticModel.load(run_copy / "elastic").spec
    models = LatencyModels.load(run_copy)
    lat = models.get(models.resolve(None))
    every = [spec.canonical(SubnetConfig(w, h, [l for l in range(spec.num_layers) if s[l]]))
             for w in itertools.product(*spec.mlp_widths) for h in itertools.product(*spec.head_counts)
             for s in itertools.product((0, 1), repeat=spec.num_layers) if not all(s)]
    every = list(dict.fromkeys(every))
    b = sorted(lat.predict_config(c) for c in every)[7]  # 8 configs of thousands fit
    rng = random.Random(0)  # proposals as the sampler's random start draws them: every choice uniform
    proposals = [spec.depth([l for l in range(spec.num_layers) if rng.random() < 0.5][: spec.num_layers - 1],
                            spec.random_config(rng)) for _ in range(1000)]
    n_fit = sum(lat.predict_config(c) <= b for c in proposals)
    assert n_fit <= 100, n_fit  # 10% at most (the tiny model has 3 layers: skipping 2 is a third of the draws)
    s = search(SearchConfig(run=str(run_copy), budget_ms=(b,), trials=6, eval_windows=2, eval_seq_len=32,
                            margin=0.0))
    per = s["per_budget"][0]
    assert per["evaluated"] == 6 and per["stop"] == "done" and s["quality_model"] is not None
    trials = pd.read_parquet(_results(run_copy) / "trials.parquet")
    ev = trials[trials["evaluated"]]
    assert ev["config"].nunique() == 6 and (ev["predicted_latency_ms"] <= b + 1e-9).all()
    infeasible = trials[trials["predicted_latency_ms"] > b + 1e-9]
    assert not infeasible["evaluated"].any()
    assert (ev["source"].isin(["knapsack", "knapsack_path", "knapsack_path_depth", "knapsack_sparse", "knapsack_depth",
                               "knapsack_width", "repair", "uniform", "search"])).all()
    assert per["repaired_here"] + per["seeded"] >= 1


def test_with_a_margin_the_ladder_is_seeded_first_and_only_it_passes_the_margin(run_copy):
    """With a margin, the study's first seeds are the knapsack's ladder (`search.knapsack.ladder`, tested
    there) between the budget and the margin; only those may be predicted above budget x (1 - margin),
    and nothing above the budget is evaluated."""
    from search.optuna_search import SearchConfig, search

    lo, hi = _budget(run_copy, 0.0), _budget(run_copy, 1.0)
    b, margin = lo + 0.6 * (hi - lo), 0.2
    s = search(SearchConfig(run=str(run_copy), budget_ms=(b,), trials=8, eval_windows=2, eval_seq_len=32,
                            margin=margin))
    assert s["per_budget"][0]["evaluated"] == 8
    ev = pd.read_parquet(_results(run_copy) / "trials.parquet")
    ev = ev[ev["evaluated"]].sort_values("trial")
    assert (ev["predicted_latency_ms"] <= b + 1e-9).all()
    above = ev[ev["predicted_latency_ms"] > b * (1 - margin) + 1e-9]
    assert above["source"].str.startswith("knapsack_stretch").all()
    assert ev["source"].iloc[0].startswith("knapsack_stretch")  # the ladder is seeded first


def test_a_quality_model_measured_on_another_text_is_refused(run_copy):
    """The quality model is keyed by the corpus's content id: loading it for another text (or an edited
    one) is refused, naming the command that measures it again; the same text loads it."""
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir
    from search.quality_fit import load_quality_model

    _search(run_copy, budget_ms=(_budget(run_copy, 0.9),), trials=2)  # builds it on the run's corpus (wiki)
    spec = ElasticModel.load(run_copy / "elastic").spec
    wtag = RunDir(run_copy).weights_tag("elastic")
    load_quality_model(run_copy, "elastic", wtag, spec, "wiki")
    with pytest.raises(FlextronError, match=r"measured on 'wiki@\w+'.*flextron quality --run .* --corpus pydoc"):
        load_quality_model(run_copy, "elastic", wtag, spec, "pydoc")


def test_a_bfloat16_search_is_resumed_in_bfloat16_refuses_a_mix_and_verify_evaluates_alike(run_copy):
    import shutil

    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir
    from search.quality import QUALITY_CACHE, read_quality_cache
    from search.verify import _fallback_losses

    shutil.rmtree(run_copy / "quality", ignore_errors=True)  # the search builds its quality model itself
    b = _budget(run_copy, 0.6)
    _search(run_copy, budget_ms=(b,), eval_dtype="bfloat16")
    best = json.loads((_results(run_copy) / "best.json").read_text())
    assert best["quality_setting"].endswith("2x32:bfloat16")
    assert json.loads((_results(run_copy) / "search_config.json").read_text())["eval_dtype"] == "bfloat16"
    # the quality model the search built for its seeds was measured in the search's precision too
    quality_config = json.loads((run_copy / "quality" / "elastic" / "quality_config.json").read_text())
    assert quality_config["eval_dtype"] == "bfloat16"
    again = _search(run_copy, budget_ms=(b,))  # auto: the kept search's precision, so it resumes
    assert again["quality_evaluations"] == 0
    with pytest.raises(FlextronError, match="--eval-dtype.*--restart"):
        _search(run_copy, budget_ms=(b,), eval_dtype="float32")
    # verify's uniform fallbacks are scored in the search's precision, so their losses compare with the picks'
    spec = ElasticModel.load(run_copy / "elastic").spec
    todo = [c for c in spec.uniform_configs()
            if c.key not in read_quality_cache(run_copy / "search" / QUALITY_CACHE, best["quality_setting"])][:1]
    assert todo and _fallback_losses(RunDir(run_copy), _results(run_copy) / "best.json", best, todo, "cpu") == 1
    assert todo[0].key in read_quality_cache(run_copy / "search" / QUALITY_CACHE, best["quality_setting"])


def test_the_runs_sqlite_storage_commits_to_a_write_ahead_log(tmp_path):
    """Optuna commits once per parameter; the run's SQLite file is opened in WAL mode with NORMAL sync
    on every connection (a commit appends to the log instead of syncing the file)."""
    import sqlite3
    from types import SimpleNamespace

    from sqlalchemy import text

    from search.study import STORAGE_FILE, open_storage

    storage = open_storage(SimpleNamespace(storage=""), tmp_path)
    with storage.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL, on Optuna's own connections
    assert sqlite3.connect(tmp_path / "search" / STORAGE_FILE).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

"""`flextron route` as a stage: it trains, saves and answers budgets, its folder is swapped in whole, it
reads the run's corpus, it uses the analytic table only for a regime never profiled and only with
--analytic, and it
refuses bad flags and damaged files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

REPO = Path(__file__).resolve().parents[2]
REGIME = "prefill:b1:s64"  # never profiled in these runs: the analytic table
FAST = dict(regime=REGIME, static_steps=20, dynamic_steps=2, surrogate_samples=4, eval_windows=1, eval_seq_len=16,
            seq_len=16, batch_size=1, calib_windows=1, select_windows=2, select_rounds=2, select_reps=1,
            select_warmup=0, surrogate_threshold=0.99, corpus="pydoc", analytic=True, grid_points=5,
            surrogate_steps=300)


@pytest.fixture(scope="module")
def routed(tiny_run, tmp_path_factory):
    """A run routed once on its one-shot weights, in a never-profiled regime, with --corpus pydoc;
    returns (run, the corpora every token_windows call was given, route's summary, its stderr)."""
    import contextlib
    import io

    import flextron.data
    from search.route import RouteConfig, route

    run = tmp_path_factory.mktemp("route") / "run"
    shutil.copytree(tiny_run, run)
    seen, real = [], flextron.data.token_windows

    def spy(*a, **k):
        seen.append(a[5] if len(a) > 5 else k.get("corpus"))
        return real(*a, **k)

    err, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess below: a busy 2-core machine oversubscribes more threads
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
            mp.setattr(flextron.data, "token_windows", spy)
            out = route(RouteConfig(run=str(run), **FAST))
    finally:
        torch.set_num_threads(threads)
    return run, seen, out, err.getvalue()


def _folder(run):
    from flextron.router_store import regime_dir
    from flextron.spec import Regime

    return regime_dir(run, Regime.parse(REGIME).key, weights="elastic")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_route_command_trains_saves_and_answers_budgets(trained_run, tmp_path, profiled_copy, monkeypatch):
    """Profiled, and the dynamic-vs-static selection measured, on the known-latency timer
    (tests/known_latency.py): the reference, every measured ratio and the budgets answered are known
    numbers, whatever else runs on the machine."""
    from known_latency import KnownLatency

    from flextron.elastic import ElasticModel
    from flextron.router_store import Routers, regime_dir
    from flextron.static_router import _moves
    from profiler.latency_model import LatencyModels
    from search.route import RouteConfig, route

    known = KnownLatency().install(monkeypatch)
    run = profiled_copy(trained_run, tmp_path / "r", "prefill:b1:s64", 6)
    full = ElasticModel.load(run / "trained").spec.full()
    with pytest.raises(FlextronError, match="holds no routers"):
        route(RouteConfig(run=str(run), budget_ms=1.0))
    out = route(RouteConfig(run=str(run), static_steps=100, dynamic_steps=2, surrogate_samples=24, eval_windows=2,
                            eval_seq_len=32, seq_len=32, batch_size=2, select_windows=4, select_rounds=2,
                            select_reps=2, surrogate_threshold=0.5, surrogate_hidden=32, static_hidden=16))
    folder = regime_dir(run, out["regime"], weights="trained")
    assert folder.name == "trained" and not (folder.parent / "elastic").exists()
    assert not list(folder.parent.glob("*.tmp")) and not list(folder.parent.glob("*.old"))
    meta = json.loads((folder / "router.json").read_text())
    assert meta["weights"] == "trained" and meta["table"]["source"].startswith("measured")
    # the networks' sizes are kept, so the routers load as trained (not at the default sizes)
    assert meta["architecture"] == {"surrogate_hidden": 32, "static_hidden": 16}
    saved = {p.name for p in folder.iterdir()}
    assert {"static_router.safetensors", "surrogate.safetensors", "dynamic_router.safetensors"} <= saved
    assert not (folder / "joint").exists()  # no weights are tuned with the router
    # the dynamic router is calibrated per budget on calibration text: a budget is met in expectation
    # (the full budget always) unless even the narrowest routing (the largest shift) misses it, and a
    # budget between two calibrated ones is served by the lower one
    calib = sorted(meta["dynamic_calibration"], key=lambda c: c["router_frac"])
    assert len(calib) == 9 and calib[-1]["meets"]
    # (values are stored rounded to 4 places)
    assert all(c["expected_frac"] <= c["router_frac"] + 1e-4 if c["meets"]
               else c["expected_frac"] > c["router_frac"] - 1e-4 for c in calib)
    assert all(c["meets"] or c["shift"] == 32.0 for c in calib)
    # every point was measured against the static configs and says what it serves, with both measurements
    measured = meta["selection"]
    statics, dynamics = measured["statics"], measured["dynamics"]
    assert len(dynamics) == 9 and all(d["ratio"] > 0 and d["loss"] > 0 for d in dynamics)
    assert len(statics) >= 2 and all(x["ratio"] > 0 for x in statics)
    # each measured as the known timer reports it (a dynamic point runs every MLP neuron at its heads)
    assert measured["full_ms"] == round(known.e2e_ms(full), 4)
    for x in statics:
        cfg = SubnetConfig.from_dict(x["config"])
        assert (x["ratio"], x["measured_ms"]) == (round(known.ratio(cfg, full), 4), round(known.e2e_ms(cfg), 4))
    for d in dynamics:
        assert d["ratio"] == round(known.ratio(SubnetConfig(full.mlp_width, tuple(d["point"]["heads"])), full), 4)
    for c in calib:  # what measured best within each budget serves it
        sel, t = c["selection"], c["router_frac"]
        assert c["serve"] == sel["serve"] in ("dynamic", "static")
        within = [x["loss"] for x in statics if x["ratio"] <= t]
        fits = [d["loss"] for d in dynamics if d["ratio"] <= t]
        if c["serve"] == "dynamic":
            assert sel["dynamic"]["ratio"] <= t and sel["dynamic"]["loss"] == min(fits)
            assert not within or sel["dynamic"]["loss"] < min(within)
        else:
            assert not fits or (within and min(within) <= min(fits))
            assert not within or sel["static"]["loss"] == min(within)
    assert measured["rounds"] == 2 and measured["quality_tokens"] == 4 * 31
    assert len(out["served"]) == 9
    routers = Routers.load(run, out["regime"], ElasticModel.load(run / "trained").spec, weights="trained")
    # routers trained on the trained weights never serve the one-shot ones
    with pytest.raises(FlextronError, match="holds no routers"):
        Routers.load(run, out["regime"], routers.spec, weights="elastic")
    with pytest.raises(FlextronError, match="holds no routers"):
        route(RouteConfig(run=str(run), budget_ms=1.0, weights="elastic"))
    mid, nxt = sorted(meta["dynamic_calibration"], key=lambda c: c["router_frac"])[4:6]
    assert routers.dynamic_point((mid["router_frac"] + nxt["router_frac"]) / 2) == mid
    low = min(c["router_frac"] for c in meta["dynamic_calibration"])
    assert routers.dynamic_point(low)["router_frac"] == low
    with pytest.raises(FlextronError, match="below the routers' smallest calibrated budget"):
        routers.dynamic_point(low * 0.9)  # nothing calibrated fits: never the smallest point, over budget
    spec = ElasticModel.load(run / "trained").spec
    lat = LatencyModels.load(run).get(out["regime"])
    lo_ms, hi_ms = lat.predict_config(spec.smallest()), lat.predict_config(spec.full())
    for budget in (2 * max(lo_ms, hi_ms), lo_ms + 0.5 * abs(hi_ms - lo_ms)):
        answer = route(RouteConfig(run=str(run), budget_ms=budget))
        chosen = spec.validate(SubnetConfig.from_dict(answer["config"]))
        assert answer["source"] == "router" and lat.predict_config(chosen) <= budget + 1e-9
        # no budget is left idle: no single wider choice would still fit (at the full budget: the full model)
        assert all(lat.predict_config(c) > budget for c in _moves(chosen, spec, +1))
        if budget >= hi_ms:
            assert chosen == spec.full()
    with pytest.raises(FlextronError, match="below the smallest"):
        route(RouteConfig(run=str(run), budget_ms=1e-6))
    # a surrogate that misses the threshold stops before any router is trained
    with pytest.raises(FlextronError, match="surrogate"):
        route(RouteConfig(run=str(run), static_steps=10, dynamic_steps=1, surrogate_samples=24,
                          eval_windows=2, eval_seq_len=32, surrogate_threshold=1e-9))
    assert Routers.load(run, out["regime"], spec, weights="trained").meta["surrogate"]["threshold"] == 0.5
    # the router's answer seeds the search, marked as router-chosen
    import pandas as pd

    from search.optuna_search import SearchConfig, results_dir, search

    search(SearchConfig(run=str(run), budget_ms=(1e6,), trials=2, eval_windows=2, eval_seq_len=32))
    results = results_dir(run, out["regime"], "trained")
    assert "router" in set(pd.read_parquet(results / "trials.parquet")["source"])
    assert json.loads((results / "best.json").read_text())["weights"] == "trained"
    # one Budget: the search and the routers resolve a fraction against the same reference to the same ms
    search(SearchConfig(run=str(run), budget_frac=(1.5,), trials=2, eval_windows=2, eval_seq_len=32))
    b = next(x for x in json.loads((results / "best.json").read_text())["best"] if x["budget_frac"] == 1.5)
    assert meta["reference_full_ms"] == b["reference_full_ms"] == pytest.approx(known.e2e_ms(full), rel=1e-9)
    # the routers' one reference is the measured full step: their table's full model costs exactly it
    assert meta["table"]["full_ms"] == pytest.approx(meta["reference_full_ms"], rel=1e-6)
    for a in meta["static_answers"] + meta["dynamic_calibration"]:
        assert a["budget_ms"] == pytest.approx(a["budget_frac"] * meta["reference_full_ms"], rel=1e-5)
    assert routers.dynamic_point_for(b["budget_ms"]) == routers.dynamic_point(b["budget_ms"] / meta["table"]["full_ms"])
    # a profiled regime whose fit is missing is an error naming `flextron fit`, never the analytic table
    shutil.rmtree(run / "latency_model")
    with pytest.raises(FlextronError, match="not fitted yet.*flextron fit"):
        route(RouteConfig(run=str(run), regime=out["regime"], static_steps=10, surrogate_samples=24))


def test_analytic_table_is_labelled_when_regime_not_profiled(tiny_run):
    from flextron.elastic import ElasticModel
    from search.route import latency_table

    spec = ElasticModel.load(tiny_run / "elastic").spec
    t = latency_table(tiny_run, "prefill:b1:s64", spec)
    assert t.source.startswith("analytic") and t.unit == "relative"
    assert t.mlp.shape == (spec.num_layers, len(spec.mlp_widths[0]))
    assert (t.mlp.diff(dim=-1) > 0).all()


def test_route_reads_the_corpus_it_is_given(routed):
    run, seen, _, _ = routed
    # surrogate losses, router training, calibration, the dynamic-vs-static selection
    assert len(seen) == 4 and set(seen) == {"pydoc"}
    assert json.loads((_folder(run) / "route_config.json").read_text())["corpus"] == "pydoc"
    meta = json.loads((_folder(run) / "router.json").read_text())
    assert len(meta["static_answers"]) == 5  # --grid-points: the budgets answered and calibrated
    assert meta["quality_setting"].split(":")[1].startswith("pydoc@")  # the corpus, with its content id


def test_never_profiled_regime_falls_back_to_the_analytic_table_and_says_so(routed):
    from search.route import RouteConfig, route

    run, _, out, err = routed
    assert out["table_source"].startswith("analytic") and out["routers"] == str(_folder(run))
    assert "was never profiled" in err and "analytic" in err
    with pytest.raises(FlextronError, match="needs a latency model"):
        route(RouteConfig(run=str(run), regime=REGIME, budget_ms=1.0))
    with pytest.raises(FlextronError, match="--regime: cannot read regime"):  # a typo is an error, never "not profiled"
        route(RouteConfig(run=str(run), regime="prefil:b1:s64"))
    # a regime that parses but was never profiled trains on made-up costs only when asked to
    before = sorted(p.name for p in _folder(run).parent.iterdir())
    with pytest.raises(FlextronError, match="never profiled.*--analytic"):
        route(RouteConfig(run=str(run), **{**FAST, "analytic": False, "regime": "prefill:b1:s32"}))
    assert sorted(p.name for p in _folder(run).parent.iterdir()) == before


def test_profiled_but_not_fitted_regime_is_an_error(routed, tmp_path):
    import pandas as pd

    from search.route import RouteConfig, route

    run = tmp_path / "r"
    shutil.copytree(routed[0], run, ignore=shutil.ignore_patterns("router"))
    (run / "profile" / "parts").mkdir(parents=True)  # a profile in progress holds rows for the regime
    pd.DataFrame({"regime": ["prefill:b1:s64:float32:eager"], "latency_ms_median": [1.0]}).to_parquet(
        run / "profile" / "parts" / "e2e-00000.parquet")
    with pytest.raises(FlextronError, match="profiled but .* not fitted.*flextron fit"):
        route(RouteConfig(run=str(run), **FAST))
    assert not (run / "router").exists()


def test_a_killed_rerun_leaves_the_routers_folder_as_it_was(routed, tmp_path):
    """SIGKILL during a re-run (after its new dynamic router was trained and saved, before the
    calibration that belongs to it): the folder still holds the old run's routers, all of them."""
    from flextron.elastic import ElasticModel
    from flextron.router_store import Routers
    from flextron.spec import Regime

    run = tmp_path / "r"
    shutil.copytree(routed[0], run)
    before = _snapshot(_folder(run))
    script = textwrap.dedent(f"""
        import os, signal
        import search.route
        search.route.calibrate_dynamic = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        search.route.route(search.route.RouteConfig(run={str(run)!r}, **{{**{FAST!r}, "dynamic_steps": 3}}))
    """)
    # one torch thread: a busy 2-core machine otherwise slows a small CPU fit many times over
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert _snapshot(_folder(run)) == before
    # and a kill between the swap's renames is finished or undone when the routers are next read
    folder = _folder(run)
    folder.rename(folder.with_name(folder.name + ".old"))
    spec = ElasticModel.load(run / "elastic").spec
    assert Routers.load(run, Regime.parse(REGIME).key, spec, weights="elastic").meta["weights"] == "elastic"
    assert _snapshot(folder) == before


def test_damaged_router_files_name_the_file_and_the_command(routed, tmp_path):
    from flextron.elastic import ElasticModel
    from flextron.router_store import Routers
    from flextron.spec import Regime

    run = tmp_path / "r"
    shutil.copytree(routed[0], run)
    spec, key = ElasticModel.load(run / "elastic").spec, Regime.parse(REGIME).key
    (_folder(run) / "static_router.safetensors").write_bytes(b"\x00" * 9)
    with pytest.raises(FlextronError, match=r"static_router.safetensors is corrupt.*flextron route --run"):
        Routers.load(run, key, spec, weights="elastic")
    (_folder(run) / "router.json").write_text('{"regime": ')
    with pytest.raises(FlextronError, match=r"router.json is corrupt.*flextron route --run"):
        Routers.load(run, key, spec, weights="elastic")


@pytest.mark.parametrize("field,value", [
    ("budget_ms", -1.0), ("budget_ms", float("nan")), ("surrogate_samples", 3), ("surrogate_threshold", 0.0),
    ("static_steps", 0), ("dynamic_steps", -1), ("latency_weight", float("inf")), ("select_rounds", 1),
    ("eval_windows", 0), ("eval_seq_len", 1), ("calib_windows", 0), ("batch_size", 0), ("seq_len", 1),
    ("select_windows", 0), ("fix_share", 0.2), ("threads", -1),
    ("lr", 0.0), ("seed", float("nan")), ("device", "cuda:x"), ("weights", "best"),
    ("regime", "decode:b1"), ("surrogate_lr", 0.0), ("surrogate_steps", 0), ("grid_points", 1),
    ("grid_points", 2.5),
])
def test_route_config_refuses_bad_flags_naming_them(field, value):
    from search.route import RouteConfig

    with pytest.raises(FlextronError, match="--" + field.replace("_", "-")):
        RouteConfig(run="r", **{field: value})


def test_route_refuses_a_device_this_machine_lacks(routed):
    from search.route import RouteConfig, route

    with pytest.raises(FlextronError, match="--device cuda:99"):
        route(RouteConfig(run=str(routed[0]), **{**FAST, "device": "cuda:99"}))

"""`flextron route` as a stage: its folder is swapped in whole, it reads the run's corpus, it falls back
to the analytic table only for a regime never profiled, and it refuses bad flags and damaged files."""

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

REPO = Path(__file__).resolve().parents[2]
REGIME = "prefill:b1:s64"  # never profiled in these runs: the analytic table
FAST = dict(regime=REGIME, static_steps=20, dynamic_steps=2, joint_steps=1, surrogate_samples=4, eval_windows=1,
            eval_seq_len=16, seq_len=16, batch_size=1, calib_windows=1, surrogate_threshold=0.99, corpus="pydoc")


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
    from flextron.routers import regime_dir
    from flextron.spec import Regime

    return regime_dir(run, Regime.parse(REGIME).key, weights="elastic")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_route_reads_the_corpus_it_is_given(routed):
    run, seen, _, _ = routed
    assert len(seen) == 3 and set(seen) == {"pydoc"}  # surrogate losses, router training, calibration
    assert json.loads((_folder(run) / "route_config.json").read_text())["corpus"] == "pydoc"


def test_never_profiled_regime_falls_back_to_the_analytic_table_and_says_so(routed):
    from search.route import RouteConfig, route

    run, _, out, err = routed
    assert out["table_source"].startswith("analytic") and out["routers"] == str(_folder(run))
    assert "was never profiled" in err and "analytic" in err
    with pytest.raises(FlextronError, match="needs a latency model"):
        route(RouteConfig(run=str(run), regime=REGIME, budget_ms=1.0))
    with pytest.raises(FlextronError, match="--regime: cannot read regime"):  # a typo is an error, never "not profiled"
        route(RouteConfig(run=str(run), regime="prefil:b1:s64"))


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
    from flextron.routers import Routers
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
    from flextron.routers import Routers
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
    ("static_steps", 0), ("dynamic_steps", -1), ("joint_steps", -1), ("latency_weight", float("inf")),
    ("eval_windows", 0), ("eval_seq_len", 1), ("calib_windows", 0), ("batch_size", 0), ("seq_len", 1),
    ("lr", 0.0), ("joint_lr", -1e-5), ("seed", float("nan")), ("device", "cuda:x"), ("weights", "best"),
    ("regime", "decode:b1"),
])
def test_route_config_refuses_bad_flags_naming_them(field, value):
    from search.route import RouteConfig

    with pytest.raises(FlextronError, match="--" + field.replace("_", "-")):
        RouteConfig(**{field: value})


def test_route_refuses_a_device_this_machine_lacks(routed):
    from search.route import RouteConfig, route

    with pytest.raises(FlextronError, match="--device cuda:99"):
        route(RouteConfig(run=str(routed[0]), **{**FAST, "device": "cuda:99"}))

import os

import pytest
import torch


def require_llama_cpp():
    """The `llama_cpp` module. Skipped without it, except under `make test` (which installed it and
    sets FLEXTRON_REQUIRE_LLAMACPP=1): there a missing binding fails, so nothing is skipped silently."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("FLEXTRON_REQUIRE_LLAMACPP") == "1":
            pytest.fail("llama-cpp-python is not installed but `make test` requires it; run `make setup`",
                        pytrace=False)
        pytest.skip("llama-cpp-python is installed by `make setup`", allow_module_level=True)
    return llama_cpp


@pytest.fixture(autouse=True)
def _float32_unless_asked(monkeypatch):
    """`--eval-dtype auto` picks bfloat16 on a CPU with native bfloat16 (flextron.devices.native_bf16): tests
    see float32 on every machine alike; the ones about the choice ask for it or patch this back."""
    monkeypatch.setattr("flextron.devices.native_bf16", lambda device: False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A converted tiny-llama run directory shared by tests that only read it."""
    from flextron.convert import ConvertConfig, convert

    out = tmp_path_factory.mktemp("runs") / "tiny"
    convert(ConvertConfig(model="tiny-llama", out=str(out), calib_windows=4, calib_seq_len=64))
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_run, tmp_path_factory):
    """A copy of `tiny_run` after 4 steps of `flextron train` (checkpoints every 2), for tests that only read it."""
    import shutil

    from flextron.train import TrainConfig, train

    run = tmp_path_factory.mktemp("train") / "run"
    shutil.copytree(tiny_run, run)
    train(TrainConfig(run=str(run), steps=4, batch_size=2, seq_len=64, checkpoint_every=2, lr=1e-3))
    return run


def _profiled_copy(src, dst, regime: str, e2e_random: int, fit: bool = True, e2e_depth: int = 4):
    """Copy run `src` to `dst`, profile it quickly in one regime, and (by default) fit the latency model."""
    import shutil

    from flextron.elastic import ElasticModel
    from profiler.fit import FitConfig
    from profiler.fit import fit as fit_model
    from profiler.sweep import ProfileConfig, run_sweep

    shutil.copytree(src, dst)
    cfg = ProfileConfig(run=str(dst), regime=(regime,), min_reps=3, min_time_ms=2, warmup=1, e2e_random=e2e_random,
                        e2e_depth=e2e_depth, max_rounds=6)
    run_sweep(ElasticModel.load(dst / "elastic"), dst / "profile", cfg)
    if fit:
        fit_model(FitConfig(run=str(dst)))
    return dst


@pytest.fixture(scope="session")
def profiled_copy():
    """`profiled_copy(src, dst, regime, e2e_random, fit=True)`: a profiled (and fitted) copy of a run."""
    return _profiled_copy


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """torch at one intra-op thread for the test (a busy 2-core machine oversubscribes more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def no_remeasured_rounds():
    """Rounds are never measured again for interference the machine shows while the tests run: what a
    test measures (and counts) must not depend on the machine's load. Interference is still recorded;
    tests/profiler/test_interference.py drives re-measuring with its own monitor."""
    from profiler.interference import CpuMonitor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CpuMonitor, "flag", lambda self, history, current: False)
        yield

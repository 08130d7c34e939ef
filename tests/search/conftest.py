"""Fixtures of the search-package tests: a profiled and fitted tiny run, and private copies of it."""

import pytest
from known_latency import KnownLatency


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory, profiled_copy):
    """A copy of `tiny_run` profiled on the known-latency timer (tests/known_latency.py) and fitted:
    feasible ranges, the full model's reference and the budgets resolved against it are known numbers,
    whatever else runs on the machine."""
    with pytest.MonkeyPatch.context() as mp:
        KnownLatency().install(mp)
        return profiled_copy(tiny_run, tmp_path_factory.mktemp("search") / "run", "prefill:b1:s64", 8)

@pytest.fixture
def run_copy(fitted, tmp_path):
    import shutil

    shutil.copytree(fitted, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "search", ignore_errors=True)
    shutil.rmtree(tmp_path / "run" / "verify", ignore_errors=True)
    return tmp_path / "run"

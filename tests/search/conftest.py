"""Fixtures of the search-package tests: a profiled and fitted tiny run, and private copies of it."""

import pytest


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("search") / "run", "prefill:b1:s64", 8)

@pytest.fixture
def run_copy(fitted, tmp_path):
    import shutil

    shutil.copytree(fitted, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "search", ignore_errors=True)
    shutil.rmtree(tmp_path / "run" / "verify", ignore_errors=True)
    return tmp_path / "run"

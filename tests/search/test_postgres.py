"""Optuna's RDB storage on a real PostgreSQL server (pgserver: a server from a pip wheel, started by the
test): workers share one study, a SIGKILLed worker loses nothing, a resume continues."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
from search_helpers import _budget, _shared_worker

pgserver = pytest.importorskip("pgserver")
pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    srv = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    yield srv.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    srv.cleanup()


_STORAGES = {}


def _study(url, name):
    """The study, read through one storage per URL (a storage per poll would open a connection pool each
    time and exhaust the server's clients)."""
    import optuna

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    return optuna.load_study(study_name=name, storage=_STORAGES[url])


def _evaluated(study):
    import optuna

    return {t.user_attrs["config"] for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("evaluated")}


def test_four_workers_on_postgres_evaluate_exactly_the_asked_number(fitted, postgres):
    import optuna

    b = _budget(fitted, 0.8)
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_shared_worker, [(str(fitted), postgres, b, "pg4", 10)] * 4)
    study = _study(postgres, f"pg4|budget={b:.6g}")
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # none lost, none duplicated
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in study.trials)
    assert len(_evaluated(study)) == 10


def test_a_worker_killed_mid_search_loses_nothing_and_a_resume_continues(fitted, postgres):
    """SIGKILL a worker once it has evaluated a few configs (its current trial stays RUNNING in the
    database); what it finished is kept, and a resumed search evaluates exactly the asked number."""
    b = _budget(fitted, 0.7)
    name = f"pgkill|budget={b:.6g}"
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; from search_helpers import _shared_worker; "
            f"_shared_worker(({str(fitted)!r}, {postgres!r}, {b!r}, 'pgkill', 24))")
    here = os.path.dirname(__file__)
    proc = subprocess.Popen([sys.executable, "-c", code, here, os.getcwd()])
    from search.study import study_progress

    done, claimed, deadline = set(), [], time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            study = _study(postgres, name)
            done, claimed = _evaluated(study), study_progress(study)[1]
        except KeyError:  # the study does not exist yet
            pass
        if len(done) >= 3 and claimed:  # mid-evaluation: a trial claimed and running
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert claimed and proc.wait() == -signal.SIGKILL, "the worker was not killed mid-evaluation"
    study = _study(postgres, name)
    kept = _evaluated(study)
    assert done <= kept  # nothing it had finished is lost
    assert study_progress(study)[1] == []  # its claim died with it (not after CLAIM_TTL_S)
    out = _shared_worker((str(fitted), postgres, b, "pgkill", 24))
    per = out["per_budget"][0]
    assert per["evaluated"] == 24 and per["stop"] == "done"  # the dead worker's claim did not hold a slot
    assert kept <= _evaluated(_study(postgres, name))

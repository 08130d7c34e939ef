"""Optuna studies of `flextron search`: storage, the per-layer parameters of a trial, constraints and
the sampler, what a study records (and refuses to resume under), and the claims several workers on one
study make so no config is evaluated twice."""

from __future__ import annotations

import os
import random
import re
import socket
import time
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

STORAGE_FILE = "optuna.db"


def open_storage(cfg, run_root: Path):
    """The Optuna storage of `cfg.storage` (a database URL or a journal `.log` file), else the run's SQLite file."""
    import optuna

    url = cfg.storage or f"sqlite:///{run_root / 'search' / STORAGE_FILE}"
    if not cfg.storage:
        (run_root / "search").mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        try:
            if url.endswith(".log") and "://" not in url:
                from optuna.storages.journal import JournalFileBackend

                return optuna.storages.JournalStorage(JournalFileBackend(url))
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=None)
            if not cfg.storage:  # the run's own file, on this machine's disk (a user's URL is taken as given)
                _write_ahead(storage.engine)
            return storage
        except Exception as e:
            # workers starting together on a fresh database race to create Optuna's schema (and to set its
            # log mode): the losers see "already exists" (or "locked") and find it done when they try again
            if ("already exists" in str(e) or "database is locked" in str(e)) and attempt < 3:
                time.sleep(0.2 * (attempt + 1) + random.uniform(0.0, 0.2))
                continue
            raise FlextronError(f"cannot open Optuna storage {url!r}: {type(e).__name__}: {str(e)[:200]}") from e


def _write_ahead(engine) -> None:
    """SQLite in write-ahead-log mode with NORMAL sync on every connection: a commit appends to the log
    instead of syncing the database file, which is what Optuna's one-commit-per-parameter costs (half the
    time of the default mode: benchmarks/optuna_storage.py). Readers and one writer still share the file
    across processes; a killed process loses nothing it committed (an OS crash may lose the last commits,
    never the database). The log mode is the file's (set once, here, where
    workers racing to open the file retry); the sync level is each connection's."""
    from sqlalchemy import event, text

    with engine.connect() as conn:
        conn.execute(text("PRAGMA journal_mode=WAL"))

    def pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections made while Optuna created its schema reopen with the sync level


def suggest_config(trial, spec, depth: bool = False) -> SubnetConfig:
    """Per-layer choices as ordinal indices (0 = narrowest): widths are nested and ordered, so TPE's
    numeric kernels share evidence between neighbouring widths instead of treating each as unrelated.
    With `depth`, each layer also has `skip_l` (1: skipped); a skipped layer's widths are canonical."""
    cfg = SubnetConfig(
        tuple(ws[trial.suggest_int(f"mlp_idx_{l}", 0, len(ws) - 1)] for l, ws in enumerate(spec.mlp_widths)),
        tuple(hs[trial.suggest_int(f"heads_idx_{l}", 0, len(hs) - 1)] for l, hs in enumerate(spec.head_counts)),
    )
    if not depth:
        return cfg
    skip = [l for l in range(spec.num_layers) if trial.suggest_int(f"skip_{l}", 0, 1)]
    if len(skip) == spec.num_layers:  # not a model: keep the layer whose removal was proposed last
        skip = skip[:-1]
    return spec.canonical(SubnetConfig(cfg.mlp_width, cfg.heads, tuple(skip)))


def config_params(cfg: SubnetConfig, spec, depth: bool = False) -> dict:
    params = {
        **{f"mlp_idx_{l}": spec.mlp_widths[l].index(w) for l, w in enumerate(cfg.mlp_width)},
        **{f"heads_idx_{l}": spec.head_counts[l].index(h) for l, h in enumerate(cfg.heads)},
    }
    if depth:
        params.update({f"skip_{l}": int(l in cfg.skip) for l in range(spec.num_layers)})
    return params


def constraints_of(trial):
    return trial.user_attrs.get("constraint", [0.0])


def set_constraint(trial, values: list[float]) -> None:
    """Optuna >= 5 stores constraints on the trial; older releases read them via constraints_func."""
    trial.set_user_attr("constraint", values)
    if hasattr(trial, "set_constraint"):
        for i, v in enumerate(values):
            trial.set_constraint(f"latency_over_budget_ms_{i}", v)


def tpe_sampler(seed: int, n_startup: int):
    """Univariate TPE over the ordinal choices: a sub-network's loss is close to additive in its
    per-layer widths (an additive ridge fit explains 85% of the variance of 260 measured SmolLM2
    configs), which is what per-parameter Parzen estimators model. At 24 evaluations in 60 dimensions
    it beat plain random search at every budget in 5 of 5 seeds (benchmarks/search_efficiency.py);
    multivariate TPE over categorical choices had lost to it at 0.8x with 12 evaluations."""
    import optuna

    kw = dict(seed=seed, multivariate=False, n_startup_trials=n_startup)
    if not hasattr(optuna.trial.Trial, "set_constraint"):
        kw["constraints_func"] = constraints_of
    return optuna.samplers.TPESampler(**kw)


def ensure_study_attrs(study, expected: dict) -> None:
    """Record what a study's losses and latencies mean; refuse to resume it under other meanings
    (another evaluation setting, weights, regime or device would put incomparable numbers in it)."""
    have = study.user_attrs
    why = {"latency_model_id": " (the latency model was re-fitted since: `flextron fit`)",
           "search_margin": " (--margin, or the latency model's uncertainty it defaults to)"}
    for key, value in expected.items():
        if key in have and have[key] != value:
            raise FlextronError(
                f"study {study.study_name!r} was searched with {key} {have[key]!r}, this search uses {value!r}"
                f"{why.get(key, '')}; its trials would mix. Use the same settings, another --study-prefix, or --restart"
            )
    for key, value in expected.items():
        if key not in have:
            study.set_user_attr(key, value)


CLAIM_TTL_S = 900.0  # a config claimed by a worker on another host that died is free again after this long


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_is_live(attrs: dict, now: float) -> bool:
    """A claim is live while its worker may still tell it: younger than CLAIM_TTL_S and, for a worker
    on this host, while its process exists (a search killed or interrupted here frees its claim at once,
    so a resumed search does not wait for it)."""
    if attrs.get("claimed_at", 0) <= now - CLAIM_TTL_S:
        return False
    host, _, pid = str(attrs.get("claimed_by", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host's worker (or an older claim without an owner): the TTL decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def study_progress(study):
    """(configs evaluated, live claims) of one study; a claim is (claimed_at, trial number, config)
    of a trial some worker is evaluating now."""
    import optuna

    evaluated, claims, now = set(), [], time.time()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("config")
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("evaluated"):
            evaluated.add(key)
        elif t.state == optuna.trial.TrialState.RUNNING and claim_is_live(t.user_attrs, now):
            claims.append((t.user_attrs["claimed_at"], t.number, key))
    return evaluated, sorted(c for c in claims if c[2] not in evaluated)


def storage_id(cfg) -> str:
    """Which storage trials came from (a database URL without its password)."""
    if not cfg.storage:
        return "run:search/" + STORAGE_FILE
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", cfg.storage)


def restart_studies(storage, out: Path, prefix: str) -> int:
    import shutil

    import optuna

    removed = 0
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if in_prefix(s.study_name, prefix):
            optuna.delete_study(study_name=s.study_name, storage=storage)
            removed += 1
    shutil.rmtree(out, ignore_errors=True)
    return removed


def in_prefix(study_name: str, prefix: str) -> bool:
    """Exactly this prefix's studies: `PREFIX|budget=...` and `PREFIX|frontier`. (A plain
    `startswith` would also take `PREFIX|trained|...`: the one-shot prefix is a prefix of it.)"""
    head, _, tail = study_name.rpartition("|")
    return head == prefix and (tail.startswith("budget=") or tail == "frontier")

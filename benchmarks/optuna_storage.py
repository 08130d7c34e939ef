"""What Optuna's storage costs the search's bookkeeping: 36 trials of 90 integer parameters (three budgets of
12 trials on SmolLM2's 30 layers), asked, suggested and told, in the run's default SQLite file as flextron
opens it (write-ahead log, NORMAL sync), in SQLite's default mode, in a journal file, and in memory.

    PYTHONPATH=. python benchmarks/optuna_storage.py [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
from optuna.storages.journal import JournalFileBackend

from search.study import open_storage


def bench(storage, trials: int = 36, params: int = 90) -> float:
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
    t = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        study.tell(trial, sum(trial.suggest_int(f"p{j}", 0, 7) for j in range(params)))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"optuna {optuna.__version__}; seconds for 36 trials x 90 parameters, median of {args.repeats} "
          "(each in a fresh file)")
    makers = {
        "sqlite, as flextron opens it (WAL, NORMAL sync)": lambda d: open_storage(SimpleNamespace(storage=""), d),
        "sqlite, default mode": lambda d: optuna.storages.RDBStorage(f"sqlite:///{d / 'plain.db'}"),
        "journal file": lambda d: optuna.storages.JournalStorage(JournalFileBackend(str(d / "journal.log"))),
        "in memory": lambda d: None,
    }
    for name, make in makers.items():
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                times.append(bench(make(Path(d))))
        print(f"{name:50s} {statistics.median(times):6.2f} s  (min {min(times):.2f}, max {max(times):.2f})", flush=True)


if __name__ == "__main__":
    main()

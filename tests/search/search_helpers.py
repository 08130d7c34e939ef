"""Helpers shared by the search-package tests (budgets in range, quick searches, fake latencies)."""

import json


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

def _search(run, **kw):
    from search.optuna_search import SearchConfig, search

    return search(SearchConfig(run=str(run), **{"trials": 3, "eval_windows": 2, "eval_seq_len": 32, **kw}))

def _fake_latency(monkeypatch, spec, samples=None):
    """Timer.measure returns a latency proportional to a config's parameters (deterministic), or
    `samples(fraction_of_full_params, call_number)` when given."""
    import itertools

    from profiler import timer as timer_mod
    from profiler.bench import RegimeBench
    from profiler.timer import Timing

    full = spec.full().param_count(spec)
    real_forward = RegimeBench.forward_fn
    calls = itertools.count()
    samples = samples or (lambda frac, n: [10.0 * frac] * 3)
    monkeypatch.setattr(
        RegimeBench, "forward_fn", lambda self, sub: _Tagged(real_forward(self, sub), sub.param_count(spec))
    )
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
    best["best"] = [
        {
            **best["best"][0],
            "budget_ms": 10.0 * frac,
            "budget_frac": frac,
            "reference_full_ms": 10.0,
            "config": pick.to_dict(),
            "loss": 0.0,
        }
    ]
    (folder / "best.json").write_text(json.dumps(best))
    (folder / "trials.parquet").unlink()  # no replacement candidates

def _shared_worker(args):
    """One search worker on a shared storage: (run, storage, budget ms, study prefix, trials)."""
    run, storage, b, prefix, trials = args
    from search.optuna_search import SearchConfig, search

    return search(SearchConfig(run=run, budget_ms=(b,), trials=trials, eval_windows=2, eval_seq_len=32,
                               storage=storage, study_prefix=prefix))

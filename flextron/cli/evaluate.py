"""`flextron eval`: one sub-network's validation perplexity (`flextron/evaluate.py`), or with `--router`
a budget served by the run's routers, scored and timed (`search/route_eval.py`, which measures, so it
lives past the profiler in the dependency order and is imported only when asked for)."""

from __future__ import annotations

from flextron.evaluate import EvalConfig


def evaluate(cfg: EvalConfig) -> dict:
    if cfg.router == "none":
        from flextron.evaluate import evaluate as score

        return score(cfg)
    from search.route_eval import evaluate_routed

    return evaluate_routed(cfg)

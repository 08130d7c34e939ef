"""The trials table of `flextron search`: every trial of a prefix's studies as one tidy frame, its
Pareto front, and the best evaluated config per budget."""

from __future__ import annotations

import json

from search.study import in_prefix


def collect_trials(storage, prefix: str, storage_id: str = ""):
    """Every trial of this prefix's studies as one tidy table."""
    import optuna
    import pandas as pd

    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not in_prefix(s.study_name, prefix):
            continue
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        attrs = study.user_attrs
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            loss = t.values[-1] if t.values else None
            rows.append(
                {
                    "storage": storage_id,
                    "study": s.study_name,
                    "trial": t.number,
                    "budget_ms": attrs.get("budget_ms"),
                    "budget_frac": attrs.get("budget_frac"),
                    "reference_full_ms": attrs.get("reference_full_ms"),
                    "quantile": attrs.get("quantile", "p50"),
                    "config": t.user_attrs.get("config"),
                    "predicted_latency_ms": t.user_attrs.get("predicted_latency_ms"),
                    "evaluated": bool(t.user_attrs.get("evaluated")),
                    "repeat": bool(t.user_attrs.get("repeat")),
                    "source": t.user_attrs.get("source", "search"),
                    "loss": loss if t.user_attrs.get("evaluated") else None,
                }
            )
    return pd.DataFrame(rows)


def pareto_front(df):
    """Non-dominated evaluated rows in (predicted latency, loss), sorted by latency."""
    ev = df[df["evaluated"]].drop_duplicates("config").sort_values(["predicted_latency_ms", "loss"])
    keep, best = [], float("inf")
    for idx, row in ev.iterrows():
        if row["loss"] < best:
            keep.append(idx)
            best = row["loss"]
    return ev.loc[keep]


def best_per_budget(trials) -> list[dict]:
    """The lowest-loss evaluated config of every budget in `trials`."""
    from search.lookup import optional_float

    best = []
    budgets = trials[trials["evaluated"] & trials["budget_ms"].notna()] if len(trials) else trials
    if len(budgets) and "quantile" not in budgets.columns:
        budgets = budgets.assign(quantile="p50")
    for (b, q), g in budgets.groupby(["budget_ms", "quantile"]) if len(budgets) else []:
        r = g.loc[g["loss"].idxmin()]
        frac, ref = r.get("budget_frac"), r.get("reference_full_ms")
        best.append(
            {
                "budget_ms": float(b),
                "quantile": q,
                "budget_frac": optional_float(frac),
                "reference_full_ms": optional_float(ref),
                "config": json.loads(r["config"]),
                "predicted_latency_ms": float(r["predicted_latency_ms"]),
                "loss": float(r["loss"]),
                "source": r["source"],  # search, or the seed it came from
                "study": r["study"],
            }
        )
    return best

"""The budget-to-config lookup: what a deployment reads.

For each budget of a device and regime: the best config that verify measured within it with 95%
confidence (the upper bound of its ratio to the full model, at the budget's quantile, in
the same rounds), from the verified search results and the uniform configs. Rows carry p50 and p90
step latency, the ratio and its bound, and the budget's reference. More budget never gives a worse
config: a budget inherits a smaller budget's choice when that one is better.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from flextron.errors import FlextronError
from flextron.spec import Regime, SubnetConfig

LOOKUP_JSON = "lookup.json"


@dataclass(frozen=True)
class LookupRow:
    regime: str
    device_name: str
    budget_ms: float  # the budget as searched: budget_frac x reference_full_ms
    config: SubnetConfig
    predicted_latency_ms: float | None  # None for uniform fallbacks, which were measured, not predicted
    measured_latency_ms: float  # median step, in verify's session
    ppl: float
    source: str
    weights: str = "elastic"  # the elastic weights this row's quality was measured with (export uses them)
    budget_frac: float | None = None  # the budget as a fraction of the full model (verified against the full
    #: model measured in the same session as the row's config)
    reference_full_ms: float | None = None  # the full model's median step the budget was searched against
    quantile: str = "p50"  # the quantile of per-step latency the budget bounds
    latency_ms_p50: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None  # from every sample of the verify session (p99 budgets need >= 100)
    ratio_to_full: float | None = None  # at `quantile`, median over rounds
    ratio_hi: float | None = None  # its upper 95% bound: at or below the budget fraction, by construction
    engine: str = "torch"  # where it was measured: torch (transformers) or llamacpp (its GGUF in llama.cpp)
    measured_full_ms: float | None = None  # the full model's median step in verify's session (rows from before: None)

    def latency_at_quantile(self) -> float | None:
        """The measured step latency at the quantile the budget bounds."""
        return {"p50": self.latency_ms_p50, "p90": self.latency_ms_p90, "p99": self.latency_ms_p99}[self.quantile]


class Lookup:
    def __init__(self, rows: list[LookupRow]):
        self.rows = rows

    @classmethod
    def load(cls, run_root) -> "Lookup":
        from flextron.rundir import RunDir, read_json

        run = RunDir(run_root)
        path = run.require("export", LOOKUP_JSON) / LOOKUP_JSON
        d = read_json(path, run.root)
        try:
            look = cls([LookupRow(**{**r, "config": SubnetConfig.from_dict(r["config"])}) for r in d["rows"]])
            weights, tag = d.get("weights", "elastic"), d.get("weights_tag")
        except (KeyError, TypeError, AttributeError) as e:
            raise FlextronError(f"{path} is not a lookup table ({type(e).__name__}: {e}); "
                                f"rebuild it with `flextron export --run {run.root} --lookup`") from None
        if tag is not None and (not (run.root / weights).is_dir() or run.weights_tag(weights) != tag):
            raise FlextronError(
                f"{path} was built from {weights} weights that have been replaced or removed since (`flextron train`); "
                "its rows' "
                f"configs and perplexities are not these weights'. Rebuild it: `flextron search --run {run.root}`, "
                f"`flextron verify --run {run.root}`, then `flextron export --run {run.root} --lookup`"
            )
        return look

    def for_budget(self, budget_ms: float, regime: str | None = None, quantile: str = "p50",
                   engine: str | None = None) -> LookupRow:
        """The row with the largest budget not above `budget_ms` at `quantile` (nearest feasible, never over),
        among the rows measured in `engine` when one is named."""
        rows = self.rows
        if engine is not None:
            rows = [r for r in rows if r.engine == engine]
            if not rows:
                raise FlextronError(f"the lookup holds no rows measured in {engine} (it holds "
                                    f"{sorted({r.engine for r in self.rows})}); profile with --engine {engine} "
                                    "in a run directory of its own")
        from flextron.spec import resolve_regime

        rk = resolve_regime({r.regime for r in rows}, regime, "in the lookup")
        match = [r for r in rows if r.regime == rk]
        quantiles = sorted({r.quantile for r in match})
        match = [r for r in match if r.quantile == quantile]
        if not match:
            raise FlextronError(f"the lookup holds no {quantile} budgets for {rk} (it holds {quantiles})")
        fit = [r for r in match if r.budget_ms <= budget_ms]
        if not fit:
            lo = min(r.budget_ms for r in match)
            raise FlextronError(
                f"budget {budget_ms} ms is below the smallest budget in the lookup ({lo:.4g} ms for {rk})"
            )
        return max(fit, key=lambda r: r.budget_ms)


def optional_float(v) -> float | None:
    """A float, or None for a missing value (None or NaN, as Parquet gives it back)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def uniform_losses(losses: dict[str, float], spec) -> dict[str, float]:
    """The losses of `spec`'s uniform configs among `losses` ({config key: loss}, a quality cache):
    the lookup's floor is the worst of them, never the worst of everything ever evaluated."""
    keys = {c.key for c in spec.uniform_configs()}
    return {k: v for k, v in losses.items() if k in keys}


def build_rows(verified, uniform, uniform_loss: dict[str, dict[str, float]]) -> list[dict]:
    """Per (regime, budget): the lowest-loss candidate whose upper confidence bound of its ratio to the
    full model (at the budget's quantile) is within the budget's fraction; then monotone in budget.

    `verified` holds one set of weights; `uniform` the uniform configs measured in the same rounds;
    `uniform_loss` is {regime: {uniform config key: loss}} for those weights (the uniform configs only:
    the worst of them is the floor). A candidate whose interval straddles the budget is never quoted as
    compliant."""
    from profiler.rounds import RATIO_COLUMN

    rows = []
    for (regime, quantile), vg in verified.groupby(["regime", "quantile"]):  # a p90 pick never serves p50
        weights = vg["weights"].iloc[0]
        col = RATIO_COLUMN[quantile]
        cands = [
            dict(
                config=r.config,
                predicted_latency_ms=r.predicted_latency_ms,
                measured_latency_ms=r.measured_latency_ms,
                latency_ms_p50=r.latency_ms_p50,
                latency_ms_p90=r.latency_ms_p90,
                latency_ms_p99=getattr(r, "latency_ms_p99", float("nan")),
                ratio=r.ratio,
                ratio_hi=r.ratio_hi,
                loss=r.loss,
                source=r.source,
            )
            for r in vg.itertuples()
        ]
        losses = uniform_loss.get(regime, {})
        for r in (uniform[uniform["regime"] == regime] if len(uniform) else uniform).itertuples():
            if r.config_key in losses:
                cands.append(
                    dict(
                        config=r.config,
                        predicted_latency_ms=float("nan"),
                        measured_latency_ms=r.measured_latency_ms,
                        latency_ms_p50=r.latency_ms_p50,
                        latency_ms_p90=r.latency_ms_p90,
                        latency_ms_p99=getattr(r, "latency_ms_p99", float("nan")),
                        ratio=getattr(r, col),
                        ratio_hi=getattr(r, f"{col}_hi"),
                        loss=losses[r.config_key],
                        source="uniform",
                    )
                )
        # nothing worse than the worst uniform sub-network evaluated (verify evaluates the smallest one) is
        # served: a verified pick that bad (a config skipping most layers, say) is a failed search, not an answer
        floor = max(losses.values()) if losses else math.inf
        prev = None
        for frac, bg in vg.groupby("budget_frac"):
            first = bg.iloc[0]
            fit = [c for c in cands if c["ratio_hi"] <= first["limit_frac"] and c["loss"] <= floor]
            if not fit:
                continue
            best = min(fit, key=lambda c: c["loss"])
            if prev is not None and prev["loss"] < best["loss"]:
                best = prev
            prev = best
            rows.append(
                {
                    "regime": regime,
                    "engine": Regime.parse(regime).engine,
                    "device_name": first["device_name"],
                    "budget_ms": float(first["budget_ms"]),
                    "budget_frac": float(frac),
                    "reference_full_ms": float(first["reference_full_ms"]),
                    "measured_full_ms": optional_float(first.get("measured_full_ms")),
                    "quantile": quantile,
                    "weights": weights,
                    "config": json.loads(best["config"]),
                    "predicted_latency_ms": optional_float(best["predicted_latency_ms"]),
                    "measured_latency_ms": float(best["measured_latency_ms"]),
                    "latency_ms_p50": float(best["latency_ms_p50"]),
                    "latency_ms_p90": float(best["latency_ms_p90"]),
                    "latency_ms_p99": optional_float(best["latency_ms_p99"]),
                    "ratio_to_full": float(best["ratio"]),
                    "ratio_hi": float(best["ratio_hi"]),
                    "ppl": math.exp(best["loss"]),
                    "source": best["source"],
                }
            )
    return rows


def write_lookup(run, weights: str = "auto") -> dict:
    """Build RUN/export/lookup.{json,csv} from the verified picks of one set of weights (`auto`:
    trained when it exists): a lookup never mixes configs whose quality was measured on other weights."""
    import pandas as pd

    from flextron.elastic import SPEC_FILE
    from flextron.rundir import read_parquet, rebuild, write_json_atomic, write_text_atomic
    from flextron.spec import ElasticSpec
    from search.quality import QUALITY_CACHE, read_quality_cache, search_quality_setting
    from search.verify import UNIFORM_FILE, VERIFIED_FILE

    wname, wdir = run.weights(weights)
    verified = read_parquet(run.require("verify", VERIFIED_FILE) / VERIFIED_FILE, run.root)
    if "weights" not in verified.columns:
        raise FlextronError(
            f"{run / 'verify' / VERIFIED_FILE} predates per-weights results; re-run `flextron verify --run {run.root}`"
        )
    searched = sorted(set(verified["weights"]))
    verified = verified[verified["weights"] == wname]
    if "weights_tag" in verified.columns:  # picks of weights `flextron train` has replaced since are stale
        verified = verified[verified["weights_tag"].fillna(wname) == run.weights_tag(wname)]
    if verified.empty:
        raise FlextronError(
            f"no verified picks for the {wname} weights (verified: {searched}); run "
            f"`flextron search --weights {wname}` and `flextron verify`, or export with --weights {searched[0]}"
            if searched
            else "verify holds no picks; run `flextron search` and `flextron verify`"
        )
    for col in ("ratio_hi", "limit_frac", "quantile"):
        if col not in verified.columns:
            raise FlextronError(
                f"{run / 'verify' / VERIFIED_FILE} predates verification in rounds; "
                f"re-run `flextron verify --run {run.root}`"
            )
    uniform = read_parquet(run.require("verify", UNIFORM_FILE) / UNIFORM_FILE, run.root)  # the same rounds as the picks
    cache = run / "search" / QUALITY_CACHE
    settings = {rk: search_quality_setting(run.root, rk, wname) or "" for rk in sorted(set(verified["regime"]))}
    spec = ElasticSpec.load(wdir / SPEC_FILE)
    losses = {rk: uniform_losses(read_quality_cache(cache, setting), spec) for rk, setting in settings.items()}
    rows = build_rows(verified, uniform, losses)
    if not rows:
        raise FlextronError("no verified config met its budget; widen the budgets or re-run `flextron verify`")
    out = run / "export"
    flat = pd.DataFrame(
        [{**{k: v for k, v in r.items() if k != "config"}, "config": json.dumps(r["config"])} for r in rows]
    )
    with rebuild(out, only=(LOOKUP_JSON, "lookup.csv")) as tmp:  # the JSON and the CSV always agree
        # what the rows' ppl were measured on, per regime: split, corpus with its content id, windows, weights
        write_json_atomic(tmp / LOOKUP_JSON, {"weights": wname, "weights_tag": run.weights_tag(wname),
                                              "quality_settings": settings, "rows": rows})
        write_text_atomic(tmp / "lookup.csv", flat.to_csv(index=False))
    return {
        "lookup": str(out / LOOKUP_JSON),
        "rows": len(rows),
        "weights": wname,
        "budget_frac": [r["budget_frac"] for r in rows],
        "budgets_ms": [round(r["budget_ms"], 4) for r in rows],
        "ratio_to_full": [round(r["ratio_to_full"], 4) for r in rows],
        "ppl": [round(r["ppl"], 3) for r in rows],
        "sources": [r["source"] for r in rows],
    }


@dataclass(frozen=True)
class LookupConfig:
    run: str  #: the run directory (exported with --lookup)
    budget_ms: float = 0.0  #: the step-latency budget to look up, in ms
    regime: str = ""  #: needed when the lookup holds several regimes (short form accepted)
    engine: str = ""  #: only rows measured in this engine (torch | llamacpp)
    quantile: str = "p50"  #: the lookup's p50, p90 or p99 budgets

    def __post_init__(self):
        from flextron.budget import check_quantile
        from flextron.rundir import check_finite
        from flextron.spec import ENGINES

        check_finite("budget_ms", self.budget_ms, low=0.0, low_inclusive=False)
        check_quantile(self.quantile)
        if self.engine and self.engine not in ENGINES:
            raise FlextronError(f"--engine {self.engine!r}: use one of {list(ENGINES)}")


def lookup(cfg: LookupConfig) -> dict:
    """`flextron lookup`: the row a deployment with this budget serves (nearest feasible budget,
    never over it): its config, where and how it was measured, its latency and perplexity."""
    row = Lookup.load(cfg.run).for_budget(cfg.budget_ms, cfg.regime or None, cfg.quantile, cfg.engine or None)
    return {
        "budget_ms_asked": cfg.budget_ms,
        "budget_ms": row.budget_ms,
        "budget_frac": row.budget_frac,
        "regime": row.regime,
        "engine": row.engine,
        "device_name": row.device_name,
        "quantile": row.quantile,
        "config": row.config.to_dict(),
        "measured_latency_ms": row.latency_at_quantile(),
        "median_latency_ms": row.measured_latency_ms,
        "ratio_to_full": row.ratio_to_full,
        "ppl": row.ppl,
        "source": row.source,
        "weights": row.weights,
    }

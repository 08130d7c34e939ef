"""`flextron export`: a sliced sub-model for a config or a budget, or the budget-to-config lookup."""

from __future__ import annotations

from dataclasses import dataclass

from flextron.errors import FlextronError


@dataclass(frozen=True)
class ExportConfig:
    run: str  #: the run directory
    #: full | smallest | uniform:F | skip:L1,L2 | depth:K | JSON file; exclusive with --budget-ms, --lookup
    config: str = ""
    #: a new or empty folder (hf), a FILE.gguf (gguf), or a previous export with --overwrite; never
    #: inside elastic/ or trained/
    out: str = ""
    budget_ms: float = 0.0  #: export the lookup's config for this budget in ms (needs --regime if several)
    regime: str = ""  #: with --budget-ms: the lookup's regime (short form accepted)
    lookup: bool = False  #: write RUN/export/lookup.json and .csv from the verified picks
    #: elastic | trained | auto (trained when it exists); --budget-ms uses the lookup row's own
    weights: str = "auto"
    overwrite: bool = False  #: replace the previous flextron export in --out
    quantile: str = "p50"  #: with --budget-ms: the lookup's p50, p90 or p99 budgets
    format: str = "hf"  #: hf: a transformers folder | gguf: one llama.cpp file (--out FILE.gguf)
    #: --format gguf: f32 | f16 | q8_0 weights (norms stay f32); empty: f16, or the type a llama.cpp
    #: lookup row was measured with
    gguf_type: str = ""
    engine: str = ""  #: with --budget-ms: the lookup's rows measured in this engine (torch | llamacpp)

    def __post_init__(self):
        from flextron.budget import check_quantile
        from flextron.rundir import check_finite

        check_finite("budget_ms", self.budget_ms, low=0.0)
        check_quantile(self.quantile)
        if self.format not in ("hf", "gguf"):
            raise FlextronError(f"--format {self.format!r}: use hf (a transformers folder) or gguf (a llama.cpp file)")
        if self.gguf_type:
            from flextron.gguf_export import check_gguf_type

            if self.format != "gguf":
                raise FlextronError("--gguf-type applies to --format gguf")
            check_gguf_type(self.gguf_type)
        modes = sum([bool(self.config), self.budget_ms > 0, self.lookup])
        if modes != 1:
            raise FlextronError("flextron export takes exactly one of --config CONFIG, --budget-ms X, or --lookup")
        if (self.config or self.budget_ms > 0) and not self.out:
            raise FlextronError("--out DIR is needed to write a sub-model")
        if self.lookup and (self.out or self.overwrite):
            raise FlextronError("--lookup writes RUN/export/lookup.json; --out and --overwrite apply to a sub-model "
                                "(--config or --budget-ms)")


def export(cfg: ExportConfig) -> dict:
    from flextron.elastic import ElasticModel
    from flextron.evaluate import parse_config
    from flextron.hf_export import check_out_dir, export_subnet
    from flextron.rundir import RunDir

    run = RunDir(cfg.run)
    if cfg.lookup:
        from search.lookup import write_lookup

        return write_lookup(run, cfg.weights)
    if cfg.format == "gguf":
        from flextron.gguf_export import check_gguf_out

        check_gguf_out(cfg.out, cfg.overwrite)  # before loading any weights
    else:
        check_out_dir(cfg.out, cfg.overwrite)
    if cfg.budget_ms > 0:
        from search.lookup import Lookup

        row = Lookup.load(run.root).for_budget(cfg.budget_ms, cfg.regime or None, cfg.quantile, cfg.engine or None)
        # the weights the row's quality was measured with, whatever --weights says
        weights_dir = run.weights(row.weights)[1]
        elastic = ElasticModel.load(weights_dir)
        sub = elastic.spec.validate(row.config)
        gguf_type = _measured_gguf_type(row, cfg.gguf_type) if cfg.format == "gguf" else ""
        extra = {"budget_ms": cfg.budget_ms, "regime": row.regime, "engine": row.engine, "weights": row.weights,
                 "measured_latency_ms": row.measured_latency_ms, "latency_ms_p90": row.latency_ms_p90,
                 "budget_frac": row.budget_frac, "reference_full_ms": row.reference_full_ms, "source": row.source}
    else:
        wname, weights_dir = run.weights(cfg.weights)
        elastic = ElasticModel.load(weights_dir)
        from flextron.quality_model import layer_ranking

        ranking = layer_ranking(run.root, wname) if cfg.config.strip().startswith("depth:") else None
        sub = parse_config(elastic.spec, cfg.config, ranking)
        extra = {"config_arg": cfg.config}
        gguf_type = cfg.gguf_type or "f16"
    if cfg.format == "gguf":
        from flextron.gguf_export import write_gguf

        return {**write_gguf(elastic, sub, cfg.out, gguf_type, source_gguf=run.source_gguf(),
                             elastic_dir=weights_dir, name="flextron subnet", overwrite=cfg.overwrite),
                "config": sub.to_dict(), **extra}
    return export_subnet(elastic, sub, cfg.out, extra=extra, overwrite=cfg.overwrite)


def _measured_gguf_type(row, asked: str) -> str:
    """The GGUF type to write for a lookup row: the one its latency was measured with when it was
    measured in llama.cpp (another type would run at another speed), else `asked` or f16."""
    from flextron.spec import GGUF_TYPE_OF, Regime

    regime = Regime.parse(row.regime)
    if regime.engine != "llamacpp":
        return asked or "f16"
    measured = GGUF_TYPE_OF[regime.dtype]
    if asked and asked != measured:
        raise FlextronError(f"the lookup row for this budget was measured in llama.cpp with {measured} weights; "
                            f"--gguf-type {asked} would run at another latency. Drop --gguf-type, or profile "
                            f"with --engine llamacpp --dtype {dict(map(reversed, GGUF_TYPE_OF.items()))[asked]}")
    return measured

"""`flextron export`: a sliced sub-model for a config or a budget, or the budget-to-config lookup."""

from __future__ import annotations

from dataclasses import dataclass

from flextron.errors import FlextronError


@dataclass(frozen=True)
class ExportConfig:
    run: str = "runs/demo"
    config: str = ""  # full | smallest | uniform:F | JSON file; exclusive with --budget-ms / --lookup
    out: str = ""  # a new or empty folder, or a previous export with --overwrite; never inside elastic/ or trained/
    budget_ms: float = 0.0  # export the lookup's config for this budget (needs --regime if several)
    regime: str = ""
    lookup: bool = False
    weights: str = "auto"  # elastic | trained | auto (trained when it exists); --budget-ms uses the lookup row's own
    overwrite: bool = False  # replace the previous flextron export in --out
    quantile: str = "p50"  # with --budget-ms: the lookup's p50, p90 or p99 budgets

    def __post_init__(self):
        from flextron.rundir import check_finite

        from flextron.budget import check_quantile

        check_finite("budget_ms", self.budget_ms, low=0.0)
        check_quantile(self.quantile)
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
    from flextron.export import check_out_dir, export_subnet
    from flextron.rundir import RunDir

    run = RunDir(cfg.run)
    if cfg.lookup:
        from search.lookup import write_lookup

        return write_lookup(run, cfg.weights)
    check_out_dir(cfg.out, cfg.overwrite)  # before loading any weights
    if cfg.budget_ms > 0:
        from search.lookup import Lookup

        row = Lookup.load(run.root).for_budget(cfg.budget_ms, cfg.regime or None, cfg.quantile)
        # the weights the row's quality was measured with, whatever --weights says
        elastic = ElasticModel.load(run.weights(row.weights)[1])
        sub = elastic.spec.validate(row.config)
        extra = {"budget_ms": cfg.budget_ms, "regime": row.regime, "weights": row.weights,
                 "measured_latency_ms": row.measured_latency_ms, "latency_ms_p90": row.latency_ms_p90,
                 "budget_frac": row.budget_frac, "reference_full_ms": row.reference_full_ms, "source": row.source}
    else:
        elastic = ElasticModel.load(run.weights(cfg.weights)[1])
        sub = parse_config(elastic.spec, cfg.config)
        extra = {"config_arg": cfg.config}
    return export_subnet(elastic, sub, cfg.out, extra=extra, overwrite=cfg.overwrite)

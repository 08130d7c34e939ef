"""`flextron export`: a sliced sub-model for a config or a budget, or the budget-to-config lookup."""

from __future__ import annotations

from dataclasses import dataclass

from flextron.errors import FlextronError


@dataclass(frozen=True)
class ExportConfig:
    run: str = "runs/demo"
    config: str = ""  # full | smallest | uniform:F | JSON file; exclusive with --budget-ms / --lookup
    out: str = ""
    budget_ms: float = 0.0  # export the lookup's config for this budget (needs --regime if several)
    regime: str = ""
    lookup: bool = False
    weights: str = "auto"  # elastic | trained | auto (trained when it exists)

    def __post_init__(self):
        modes = sum([bool(self.config), self.budget_ms > 0, self.lookup])
        if modes != 1:
            raise FlextronError("flextron export takes exactly one of --config CONFIG, --budget-ms X, or --lookup")
        if (self.config or self.budget_ms > 0) and not self.out:
            raise FlextronError("--out DIR is needed to write a sub-model")


def export(cfg: ExportConfig) -> dict:
    from flextron.elastic import ElasticModel
    from flextron.evaluate import parse_config
    from flextron.export import export_subnet
    from flextron.rundir import RunDir

    run = RunDir(cfg.run)
    if cfg.lookup:
        from search.lookup import write_lookup

        return write_lookup(run)
    elastic = ElasticModel.load(run.weights(cfg.weights)[1])
    extra = {}
    if cfg.budget_ms > 0:
        from search.lookup import Lookup

        row = Lookup.load(run.root).for_budget(cfg.budget_ms, cfg.regime or None)
        sub = elastic.spec.validate(row.config)
        extra = {"budget_ms": cfg.budget_ms, "regime": row.regime, "measured_latency_ms": row.measured_latency_ms,
                 "source": row.source}
    else:
        sub = parse_config(elastic.spec, cfg.config)
        extra = {"config_arg": cfg.config}
    return export_subnet(elastic, sub, cfg.out, extra=extra)

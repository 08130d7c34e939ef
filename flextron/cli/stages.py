"""The stages, one registry: command name -> (module, config dataclass, function, one-line help).

This package (`flextron.cli`) is the one place that wires stages together: the `flextron` command
and `flextron run` both look stages up here, and it is the only code under `flextron/` allowed to
import `profiler`, `search` or `reports` (lazily: `flextron eval` without `--router` never imports
the profiler).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    function: str
    help: str

    def load(self):
        """(config class, stage function), importing only this stage's module."""
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.function)


STAGES = {
    "convert": Stage("flextron.convert", "ConvertConfig", "convert", "make a nested elastic model from a source model"),
    "eval": Stage("flextron.cli.evaluate", "EvalConfig", "evaluate",
                  "validation perplexity of one sub-network, or of a budget served by the routers (timed too)"),
    "export": Stage("search.export", "ExportConfig", "export",
                    "write a sliced sub-model (transformers or GGUF) or the budget lookup table"),
    "profile": Stage("profiler.sweep", "ProfileConfig", "profile",
                     "measure every layer width and sub-networks end to end"),
    "fit": Stage("profiler.fit", "FitConfig", "fit", "fit the latency model and report its held-out error"),
    "quality": Stage("search.quality_fit", "QualityConfig", "quality",
                     "per-layer loss deltas of the weights and the quality model, scored on held-out configs"),
    "search": Stage("search.optuna_search", "SearchConfig", "search", "Optuna search for sub-networks under budgets"),
    "verify": Stage("search.verify", "VerifyConfig", "verify", "measure chosen configs on the device; replace misses"),
    "report": Stage("reports.build", "ReportConfig", "build_report", "HTML + PNG + Markdown report of a run"),
    "train": Stage("flextron.train", "TrainConfig", "train", "elastic continued training (sandwich distillation)"),
    "synth": Stage("flextron.teacher_data", "SynthConfig", "synth",
                   "teacher-generated continuations of train-split prompts, as token shards to train on"),
    "route": Stage("search.route", "RouteConfig", "route",
                   "train the static and dynamic routers, or pick a config for --budget-ms"),
    "lookup": Stage("search.lookup", "LookupConfig", "lookup",
                    "the lookup row a budget is served by (config, latency, ppl)"),
    "run": Stage("flextron.cli.run", "RunConfig", "run_pipeline",
                 "convert → profile → fit → quality → search → verify → export → report, in one run directory"),
}

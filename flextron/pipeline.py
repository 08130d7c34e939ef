"""`flextron run`: convert → profile → fit → search → verify → export → report, in one run directory.

Each stage is the same function its own command calls; finished stages are reused (convert reuses
a matching conversion, the sweep resumes from its parts, the search from its Optuna storage).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flextron.models import DEFAULT_MODEL


@dataclass(frozen=True)
class RunConfig:
    model: str = DEFAULT_MODEL
    out: str = "runs/demo"
    device: str = "cpu"
    engine: str = "torch"  # where latency is measured: torch (transformers) | llamacpp (GGUF in llama.cpp, CPU)
    regime: tuple[str, ...] = ("decode:b1:ctx256",)
    budget_frac: tuple[float, ...] = (0.7, 0.8, 0.9)
    quantile: str = "p50"  # p50 | p90 | p99 of per-step latency that the budgets bound
    trials: int = 12
    e2e_random: int = 16
    rounds: int = 6  # interleaved rounds of the profile's end-to-end set and of verify
    threads: int = 0  # CPU torch threads while measuring; 0 = one (steady on small, shared CPUs)
    eval_windows: int = 8
    mlp_choices: int = 8
    head_choices: int = 4
    restart: bool = False  # measure and search again instead of resuming the stages already in --out

    def __post_init__(self):
        from flextron.budget import check_quantile
        from flextron.devices import check_device_name
        from flextron.rundir import check_finite

        check_device_name(self.device)
        check_quantile(self.quantile)
        check_finite("rounds", self.rounds, low=2)
        check_finite("threads", self.threads, low=0)
        check_finite("trials", self.trials, low=1)
        for f in self.budget_frac:
            check_finite("budget_frac", f, low=0, low_inclusive=False, high=10)


def run_pipeline(cfg: RunConfig) -> dict:
    import sys

    from flextron.convert import ConvertConfig, convert
    from flextron.rundir import save_stage_config
    from profiler.latency_model import FitConfig, fit
    from profiler.sweep import ProfileConfig, profile
    from reports.build import ReportConfig, build_report
    from search.export import ExportConfig, export
    from search.optuna_search import SearchConfig, search
    from search.verify import VerifyConfig, verify

    t0 = time.perf_counter()
    steps = {}

    def step(name, fn, arg):
        t = time.perf_counter()
        print(f"[flextron run] {name} ...", file=sys.stderr, flush=True)
        steps[name] = fn(arg)
        steps[name]["_s"] = round(time.perf_counter() - t, 1)
        return steps[name]

    step("convert", convert, ConvertConfig(model=cfg.model, out=cfg.out, mlp_choices=cfg.mlp_choices, head_choices=cfg.head_choices))
    step("profile", profile, ProfileConfig(run=cfg.out, device=cfg.device, engine=cfg.engine, regime=cfg.regime, e2e_random=cfg.e2e_random,
                                           rounds=cfg.rounds, threads=cfg.threads, restart=cfg.restart))
    step("fit", fit, FitConfig(run=cfg.out))
    for r in cfg.regime:
        step(f"search {r}", search, SearchConfig(run=cfg.out, regime=r, budget_frac=cfg.budget_frac, trials=cfg.trials,
                                                 quantile=cfg.quantile, eval_windows=cfg.eval_windows, device=cfg.device,
                                                 skip_infeasible=True, restart=cfg.restart))
    step("verify", verify, VerifyConfig(run=cfg.out, device=cfg.device, rounds=cfg.rounds, threads=cfg.threads))
    step("export", export, ExportConfig(run=cfg.out, lookup=True))
    step("report", build_report, ReportConfig(run=cfg.out))
    save_stage_config(f"{cfg.out}/run_config.json", cfg)
    conv, fitted, look, ver = steps["convert"], steps["fit"], steps["export"], steps["verify"]
    return {
        "run": cfg.out, "model": cfg.model, "device": fitted["device"], "parity": conv["parity_max_abs_diff"],
        "latency_model": {k: v for k, v in fitted.items() if ":" in k},
        "verify": {k: ver[k] for k in ("verdicts", "noise_floor_pct", "ratio_noise_floor_pct", "threads")},
        "lookup_budget_frac": look["budget_frac"], "lookup_ratio_to_full": look["ratio_to_full"],
        "lookup_budgets_ms": look["budgets_ms"],
        "lookup_ppl": look["ppl"], "lookup_sources": look["sources"],
        "report": steps["report"]["report"], "seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": {k: v["_s"] for k, v in steps.items()},
    }

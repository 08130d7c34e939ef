"""`flextron run`: convert → profile → fit → search → verify → export → report, in one run directory.

Each stage is the same function its own command calls, looked up in the one registry
(`flextron.cli.stages`); finished stages are reused (convert reuses a matching conversion, the sweep
resumes from its parts, the search from its Optuna storage).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flextron.models import DEFAULT_MODEL
from profiler.rounds import MAX_ROUNDS, TARGET_FLOOR_PCT


@dataclass(frozen=True)
class RunConfig:
    out: str  #: the run directory to create or resume
    model: str = DEFAULT_MODEL  #: a built-in name (smollm2-135m, gemma3-270m, tiny-*), a transformers folder or a .gguf
    #: where latency is measured: cpu, cuda, cuda:N, or auto (CUDA when present, and says so; the
    #: llama.cpp engine measures on the CPU)
    device: str = "auto"
    engine: str = "torch"  #: torch (the model's transformers code) | llamacpp (its GGUF export in llama.cpp, CPU)
    regime: tuple[str, ...] = ("decode:b1:ctx256",)  #: deployment regimes to profile and search
    budget_frac: tuple[float, ...] = (0.7, 0.8, 0.9)  #: budgets as fractions of the full model's measured latency
    quantile: str = "p50"  #: p50 | p90 | p99 of per-step latency that the budgets bound
    trials: int = 12  #: configs evaluated per budget by the Optuna search
    e2e_random: int = 16  #: random heterogeneous sub-networks measured end to end (plus the uniform ones)
    rounds: int = 6  #: interleaved rounds of the profile's end-to-end set and of verify
    #: the profile's end-to-end set: more rounds for the configs whose ratio is not pinned down until its ratio
    #: noise floor is at most this (percent), at most --max-rounds each (see `flextron profile --help`)
    target_floor_pct: float = TARGET_FLOOR_PCT
    max_rounds: int = MAX_ROUNDS  #: the most rounds a config of the profile's end-to-end set gets (at least --rounds)
    threads: int = 0  #: CPU torch threads while measuring; 0 = one (steady on small, shared CPUs)
    eval_windows: int = 8  #: validation windows per config the search evaluates
    #: the precision quality is evaluated in (table, evaluations, search): float32 | bfloat16 | auto (bfloat16
    #: where the device computes it natively; a resumed stage keeps its own)
    eval_dtype: str = "auto"
    mlp_choices: int = 8  #: nested MLP widths per layer
    head_choices: int = 4  #: nested head counts per layer
    restart: bool = False  #: measure and search again instead of resuming the stages already in --out

    def __post_init__(self):
        from flextron.budget import check_quantile
        from flextron.devices import check_eval_dtype, set_device_field
        from flextron.rundir import check_finite

        set_device_field(self, cpu_only=self.engine == "llamacpp")
        check_eval_dtype(self.eval_dtype)
        check_quantile(self.quantile)
        check_finite("rounds", self.rounds, low=2)
        check_finite("max_rounds", self.max_rounds, low=self.rounds, whole=True)
        check_finite("target_floor_pct", self.target_floor_pct, low=0, low_inclusive=False)
        check_finite("threads", self.threads, low=0)
        check_finite("trials", self.trials, low=1)
        for f in self.budget_frac:
            check_finite("budget_frac", f, low=0, low_inclusive=False, high=10)


def run_pipeline(cfg: RunConfig) -> dict:
    import sys

    import torch

    from flextron.cli.stages import STAGES
    from flextron.rundir import save_stage_config

    t0 = time.perf_counter()
    steps = {}
    threads = torch.get_num_threads()

    def step(label: str, name: str, **kwargs):
        t = time.perf_counter()
        print(f"[flextron run] {label} ...", file=sys.stderr, flush=True)
        config, fn = STAGES[name].load()
        try:
            steps[label] = fn(config(**kwargs))
        finally:
            # Measuring stages pin torch to one thread (flextron.devices.set_cpu_threads); evaluation in
            # the stages after them (quality, search) runs at the process's own count, twice as fast on 2 cores.
            torch.set_num_threads(threads)
        steps[label]["_s"] = round(time.perf_counter() - t, 1)

    step("convert", "convert", model=cfg.model, out=cfg.out, mlp_choices=cfg.mlp_choices,
         head_choices=cfg.head_choices)
    step("profile", "profile", run=cfg.out, device=cfg.device, engine=cfg.engine, regime=cfg.regime,
         e2e_random=cfg.e2e_random, rounds=cfg.rounds, threads=cfg.threads, restart=cfg.restart,
         target_floor_pct=cfg.target_floor_pct, max_rounds=cfg.max_rounds)
    step("fit", "fit", run=cfg.out)
    step("quality", "quality", run=cfg.out, device=cfg.device, eval_dtype=cfg.eval_dtype, restart=cfg.restart)
    for r in cfg.regime:
        step(f"search {r}", "search", run=cfg.out, regime=r, budget_frac=cfg.budget_frac, trials=cfg.trials,
             quantile=cfg.quantile, eval_windows=cfg.eval_windows, eval_dtype=cfg.eval_dtype, device=cfg.device,
             skip_infeasible=True, restart=cfg.restart)
    step("verify", "verify", run=cfg.out, device=cfg.device, rounds=cfg.rounds, threads=cfg.threads)
    step("export", "export", run=cfg.out, lookup=True)
    step("report", "report", run=cfg.out)
    save_stage_config(f"{cfg.out}/run_config.json", cfg)
    conv, fitted, look, ver = steps["convert"], steps["fit"], steps["export"], steps["verify"]
    return {
        "run": cfg.out, "model": cfg.model, "device": fitted["device"], "parity": conv["parity_max_abs_diff"],
        "latency_model": {k: v for k, v in fitted.items() if ":" in k},
        "verify": {k: ver[k] for k in ("verdicts", "noise_floor_pct", "ratio_noise_floor_pct", "threads")},
        "lookup_budget_frac": look["budget_frac"], "lookup_ratio_to_full": look["ratio_to_full"],
        "lookup_budgets_ms": look["budgets_ms"],
        "lookup_ppl": look["ppl"], "lookup_sources": look["sources"],
        "quality": {k: steps["quality"][k] for k in ("form", "heldout", "table_seconds")},
        "search": {k: [{f: b[f] for f in ("budget_frac", "evaluated", "asked_here", "repaired_here", "seeded", "stop")}
                       for b in v["per_budget"]] for k, v in steps.items() if k.startswith("search")},
        "report": steps["report"]["report"], "seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": {k: v["_s"] for k, v in steps.items()},
    }

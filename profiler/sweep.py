"""`flextron profile`: every layer at every allowed width, plus whole sub-networks end to end.

Layer cells run the model's own attention and MLP modules, sliced to the cell's width, with the
exact arguments the model passes them (captured from a real forward: rotary embeddings, masks, a
real static KV cache for decode; profiler/bench.py). End-to-end cells run the whole sliced model.

A sweep is resumable and says what it measured:
- `profile_config.json` and `device.json` are written when the sweep starts. A resumed sweep must
  be given the same settings (every field in RESUME_FIELDS, `--regime` included: a new regime needs
  `--restart` or its own run directory) on the same device; `device.json` keeps the first start's
  facts. `--layers-only` may change between runs: a later run without it adds the end-to-end cells
  with the same settings.
- Rows go to numbered Parquet parts (profiler/parts.py), written every FLUSH_S seconds, every few
  cells and when the sweep is interrupted (Ctrl-C or SIGTERM), so an interrupted sweep loses only
  the cell in flight and a SIGKILL at most FLUSH_S seconds of finished cells; the resume measures
  exactly the cells missing from the parts.
- A cell that runs out of memory (any mode) or fails in `cuda_graph` mode is recorded as a row with
  its status and the sweep goes on; the summary counts cells by status per regime, and `flextron fit`
  refuses a regime with failed cells unless told `--allow-errors`.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flextron.devices import PIN_AUTO, check_device, pinned, set_cpu_threads, set_device_field
from flextron.errors import FlextronError
from flextron.rundir import (
    RunDir,
    check_finite,
    check_resume,
    read_json,
    save_stage_config,
    write_json_atomic,
    write_parquet_atomic,
)
from flextron.spec import DTYPE_BYTES, ENGINES, MODES, Regime, SubnetConfig
from profiler.bench import RegimeBench
from profiler.energy import energy_per_token
from profiler.parts import Interrupts, PartWriter, read_part
from profiler.profile import DEVICE_FILE, E2E_FILE, LAYERS_FILE, NOISE_FILE, PARTS_DIR, SAMPLES_FILE, profile_dir
from profiler.rounds import MAX_ROUNDS, MAX_SECONDS, TARGET_FLOOR_PCT

CONFIG_FILE = "profile_config.json"

# Settings that change what a cell measures: a resumed sweep must match them all, or its parts
# would mix two measurements under one cell key. (`dtype` and `mode` come before `regime` so that
# changing --dtype is reported as --dtype, not as the regime keys it resolves into.)
RESUME_FIELDS = ("device", "engine", "dtype", "mode", "regime", "e2e_random", "e2e_depth", "seed", "min_reps",
                 "min_time_ms", "warmup", "anchor_every", "energy_s", "rounds", "reps", "threads", "e2e_warmup")


@dataclass(frozen=True)
class ProfileConfig:
    run: str  #: the run directory (made by `flextron convert`); the profile goes to RUN/profile/
    #: where latency is measured: cpu, cuda, cuda:N, or auto (CUDA when present, and says so; the
    #: llama.cpp engine measures on the CPU)
    device: str = "auto"
    engine: str = "torch"  #: torch (the model's transformers code) | llamacpp (its GGUF export in llama.cpp, CPU)
    #: deployment regimes to measure: decode:bBATCH:ctxCONTEXT or prefill:bBATCH:sLENGTH, each optionally
    #: followed by :DTYPE and :MODE (e.g. decode:b1:ctx1024:bfloat16:cuda_graph)
    regime: tuple[str, ...] = ("decode:b1:ctx256", "prefill:b1:s128")
    #: dtype (float32 | bfloat16 | float16 | q8_0) of the regimes that name none; empty: float32 on CPU,
    #: bfloat16 on CUDA, q8_0 in llama.cpp
    dtype: str = ""
    #: execution mode (eager | cuda_graph | llamacpp) of the regimes that name none; empty: eager on CPU,
    #: cuda_graph on CUDA, llamacpp for --engine llamacpp
    mode: str = ""
    e2e_random: int = 16  #: random heterogeneous sub-networks measured end to end (beside every uniform one)
    #: random sub-networks that skip layers, measured end to end: half skip layers of the full model, half
    #: also take random widths (each skips 1 to half of the layers); what the latency model learns depth from
    e2e_depth: int = 12
    seed: int = 0  #: seed of the random end-to-end configs, the layer cells' order and the rounds' shuffles
    #: torch layer cells: the fewest timed repetitions of a cell; timing goes on until --min-time-ms is also
    #: met (2000 repetitions at most)
    min_reps: int = 10
    #: torch layer cells: the least total timed time of a cell, in ms; 0: --min-reps alone decides
    min_time_ms: float = 30.0
    warmup: int = 3  #: untimed calls before a layer cell is timed
    #: torch engine: untimed steps before an end-to-end config's timed ones in each round, besides the one that
    #: fills its cache; -1: the kept profile's on resume, else profiler.timer.default_e2e_warmup (0 on the CPU,
    #: 1 on CUDA). llama.cpp's end-to-end steps take --warmup
    e2e_warmup: int = -1
    anchor_every: int = 40  #: re-measure the anchor layer cell after this many cells, to expose and correct drift
    #: CUDA with NVML: seconds of each energy-per-token measurement (uniform configs only); 0 skips it
    energy_s: float = 0.5
    #: end-to-end: interleaved rounds (every config and the full model once per round, in a fresh order)
    rounds: int = 6
    reps: int = 3  #: end-to-end: timed steps per config per round (after --e2e-warmup untimed ones)
    #: end-to-end: after --rounds, configs whose own split-half ratio error is above this (percent) get two
    #: more rounds at a time, settled ones none, until the ratio noise floor is at most it (3% reached its floor
    #: on a 2-core VM but fitted no better a latency model, 35-63 s slower: docs/results.md, session 12)
    target_floor_pct: float = TARGET_FLOOR_PCT
    max_rounds: int = MAX_ROUNDS  #: end-to-end: the most rounds a config gets while the target is not reached
    #: end-to-end: no batch of added rounds starts after this many seconds of adding them (the stage says so)
    max_seconds: float = MAX_SECONDS
    #: CPU: intra-op threads of torch (or llama.cpp) while measuring, recorded in device.json; 0: one (steady on
    #: small, shared CPUs; see flextron.devices)
    threads: int = 0
    #: CPU (Linux): pin the measuring process to this core (the one pinned to is recorded in device.json); -2:
    #: the last core it may use when measuring on one thread (steadier: benchmarks/pinning.py), else not
    #: pinned; -1: not pinned
    pin_core: int = PIN_AUTO
    #: measure the layer cells only; a later run without it adds the end-to-end cells to the same profile
    layers_only: bool = False
    #: remove RUN/profile/ and measure everything again (without it, a stopped sweep resumes where it stopped)
    restart: bool = False

    def __post_init__(self):
        set_device_field(self, cpu_only=self.engine == "llamacpp")
        if self.engine not in ENGINES:
            raise FlextronError(f"--engine {self.engine!r}: use one of {list(ENGINES)}")
        if not self.regime:
            raise FlextronError("give at least one --regime, e.g. --regime decode:b1:ctx1024")
        for name, low in (("e2e_random", 0), ("e2e_depth", 0), ("seed", None), ("min_reps", 1), ("warmup", 0),
                          ("anchor_every", 1), ("rounds", 2), ("reps", 1), ("threads", 0), ("pin_core", PIN_AUTO),
                          ("e2e_warmup", -1)):
            check_finite(name, getattr(self, name), low=low, whole=True)
        check_finite("min_time_ms", self.min_time_ms, low=0)
        check_finite("energy_s", self.energy_s, low=0)
        check_finite("max_rounds", self.max_rounds, low=self.rounds, whole=True)
        self.precision()  # the target and the cap are checked here, before anything is measured
        if self.dtype and self.dtype not in DTYPE_BYTES:
            raise FlextronError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.mode and self.mode not in MODES:
            raise FlextronError(f"--mode must be one of {list(MODES)}, got {self.mode!r}")
        keys = [r.key for r in self.regimes()]
        if len(set(keys)) < len(keys):
            raise FlextronError(f"--regime names the same regime twice ({keys}); give each once")

    def precision(self):
        """How far the end-to-end set's rounds go (profiler.rounds.refine)."""
        from profiler.rounds import Precision

        return Precision(self.target_floor_pct, self.max_rounds, self.max_seconds)

    def _defaults(self) -> tuple[str, str]:
        cuda = self.device.startswith("cuda")
        if self.engine == "llamacpp":
            return self.dtype or "q8_0", self.mode or "llamacpp"
        return self.dtype or ("bfloat16" if cuda else "float32"), self.mode or ("cuda_graph" if cuda else "eager")

    def regimes(self) -> list[Regime]:
        cuda = self.device.startswith("cuda")
        dtype, mode = self._defaults()
        out = [Regime.parse(r, dtype=dtype, mode=mode) for r in self.regime]
        for r in out:
            if r.mode == "cuda_graph" and not cuda:
                raise FlextronError(f"regime {r.key}: cuda_graph mode needs --device cuda; use eager on CPU")
            if r.engine != self.engine:
                raise FlextronError(f"regime {r.key} runs in the {r.engine} engine but --engine is {self.engine}; "
                                    "profile each engine into its own run directory")
            if r.engine == "llamacpp" and cuda:
                raise FlextronError("the llama.cpp engine measures on the CPU here; pass --device cpu")
        return out

    def resolved(self) -> "ProfileConfig":
        """This config with its defaults made explicit (dtype, mode, full regime keys): what is saved
        and compared on resume, so `decode:b1:ctx32` and `decode:b1:ctx32:float32:eager` match."""
        dtype, mode = self._defaults()
        return dataclasses.replace(self, dtype=dtype, mode=mode, regime=tuple(r.key for r in self.regimes()))


def random_configs(spec, n: int, seed: int) -> list[SubnetConfig]:
    rng = random.Random(seed)
    out, seen = [], set(spec.uniform_configs())
    for _ in range(20 * n + 20):  # capped: small specs have few distinct configs
        if len(out) == n:
            break
        cfg = spec.random_config(rng)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def depth_configs(spec, n: int, seed: int) -> list[SubnetConfig]:
    """`n` distinct configs that skip 1 to half of the layers (at least one layer always runs):
    alternately at full width and with random widths too. Drawn from their own seeded stream,
    so the width-only random set stays what it was."""
    rng = random.Random(f"depth:{seed}")
    out, seen = [], set()
    most = max(1, spec.num_layers // 2)
    for i in range(20 * n + 20):  # capped: tiny models have few distinct configs
        if len(out) == n:
            break
        base = spec.full() if i % 2 == 0 else spec.random_config(rng)
        k = rng.randint(1, most) if spec.num_layers > 1 else 0
        cfg = spec.depth(rng.sample(range(spec.num_layers), k), base)
        if cfg.skip and cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def _layer_cells(spec, bridged=()) -> list[tuple[int, str, int]]:
    """Every isolated cell of a profile; `bridged`: the layers whose skip runs a linear bridge."""
    cells = [(-1, "embed", 0), (-1, "head", 0)]
    for layer in range(spec.num_layers):
        cells.append((layer, "layer", 0))  # the whole layer: what skipping it saves
        if layer in bridged:
            cells.append((layer, "bridge", 0))  # what skipping it costs instead
        cells += [(layer, "mlp", w) for w in spec.mlp_widths[layer]]
        cells += [(layer, "attn", h) for h in spec.head_counts[layer]]
    return cells


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def status_kind(status: str) -> str:
    """`ok`, `oom` or `error` for a cell's recorded status (errors carry their message)."""
    return status if status in ("ok", "oom") else "error"


def cells_by_status(rows, regime_keys) -> dict[str, dict[str, int]]:
    """{regime: {"ok": n, "oom": n, "error": n}} over every row (layer, anchor and end-to-end cells)."""
    out = {}
    for rk in regime_keys:
        counts = {"ok": 0, "oom": 0, "error": 0}
        for df in rows:
            if len(df):
                for s in df.loc[df["regime"] == rk, "status"]:
                    counts[status_kind(s)] += 1
        out[rk] = counts
    return out


def _read_state(path: Path, run_root: Path) -> dict:
    """A saved record of the sweep being resumed; a corrupt one names the way out (a resume needs it)."""
    try:
        return read_json(path, run_root)
    except FlextronError as e:
        raise FlextronError(f"{e}, adding --restart: a sweep cannot resume without {path.name}") from None


def _start_or_resume(out_dir: Path, cfg: ProfileConfig, info: dict) -> None:
    """Save the settings and the device facts when a sweep starts; when it resumes, refuse other
    settings or another device, and keep the first `device.json` (it says when the measurements began)."""
    run_root = out_dir.parent
    config_path, device_path = out_dir / CONFIG_FILE, out_dir / DEVICE_FILE
    resolved = cfg.resolved()
    if not config_path.is_file():
        if any((out_dir / PARTS_DIR).glob("*.parquet")) or (out_dir / LAYERS_FILE).is_file():
            raise FlextronError(f"{out_dir} holds measurements but no {CONFIG_FILE} saying how they were made "
                                "(an older flextron?); pass --restart to measure again (the folder is removed)")
        write_json_atomic(device_path, info)
        save_stage_config(config_path, resolved)
        return
    prev = _read_state(config_path, run_root)
    check_resume(config_path, resolved, RESUME_FIELDS, what=f"the profile in {out_dir}")
    if device_path.is_file():
        prev = _read_state(device_path, run_root)
        prev_name = prev.get("device_name")
        if prev.get("engine", "torch") != info["engine"]:
            raise FlextronError(f"{out_dir} holds a profile measured in {prev.get('engine', 'torch')}; this one is "
                                f"{info['engine']}. Profile each engine into its own run directory, or pass --restart")
        if prev_name != info["device_name"]:
            raise FlextronError(
                f"{out_dir} holds a profile from {prev_name!r}; this device is {info['device_name']!r}. "
                "Profile each device into its own run directory, or pass --restart to replace it"
            )
    else:  # removed by hand: this start's facts are the best record left
        write_json_atomic(device_path, info)
    # The compared settings are unchanged; `layers_only` stays false once any run measured end to end.
    save_stage_config(config_path, dataclasses.replace(
        resolved, layers_only=bool(prev.get("layers_only", True)) and cfg.layers_only))


def run_sweep(elastic, out_dir: str | Path, cfg: ProfileConfig, progress=None) -> dict:
    """Measure `elastic` on cfg.device for every regime into `out_dir`: layers/e2e Parquet, device.json
    and profile_config.json. Resumes a sweep that was stopped (same settings), or starts again with
    cfg.restart. Returns the summary: cell counts (`cells_by_status` per regime), anchor drift."""
    import pandas as pd

    from profiler.telemetry import Telemetry

    out_dir = Path(out_dir)
    regimes = cfg.regimes()  # everything that can refuse the sweep is checked before --restart removes anything
    binding = None
    if cfg.engine == "llamacpp":
        from profiler.llamacpp import require_binding

        binding = require_binding().__version__
    if cfg.restart and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.e2e_warmup < 0:  # a kept profile's own (1, or --warmup before it had its own), else the default
        from profiler.timer import default_e2e_warmup

        kept = _read_state(out_dir / CONFIG_FILE, out_dir.parent) if (out_dir / CONFIG_FILE).is_file() else {}
        fresh = default_e2e_warmup(cfg.device)  # the torch engine's; llama.cpp's steps take --warmup
        cfg = dataclasses.replace(cfg, e2e_warmup=int(kept.get("e2e_warmup", kept.get("warmup", fresh))))
    threads = set_cpu_threads(cfg.device, cfg.threads)  # before device_info, which records the count
    tele = Telemetry(cfg.device)
    info = {**tele.device_info(), "threads_choice": threads, "engine": cfg.engine, "pinned_core": cfg.pin_core}
    if binding is not None:
        info["llama_cpp_python"] = binding
    _start_or_resume(out_dir, cfg, info)
    # llama.cpp: the GGUF file the run was converted from (None: none), whose tokenizer every export copies
    source_gguf = RunDir(out_dir.parent).source_gguf() if cfg.engine == "llamacpp" else None
    spec = elastic.spec
    rng = random.Random(cfg.seed)
    base = {"device": str(tele.device), "device_name": info["device_name"], "model_family": spec.family,
            "engine": cfg.engine}
    n_measured = 0
    with Interrupts() as interrupts:
        layers_w = PartWriter(out_dir / PARTS_DIR, "layers", guard=interrupts.deferred)
        e2e_w = PartWriter(out_dir / PARTS_DIR, "e2e", flush_every=4, guard=interrupts.deferred)
        done = layers_w.done_keys() | e2e_w.done_keys()
        try:
            for regime in regimes:
                n_measured += _sweep_regime(elastic, regime, cfg, tele, base, rng, done, layers_w, e2e_w,
                                            source_gguf, progress)
        finally:  # an interrupt, or any error: the finished rows are kept for the resume
            with interrupts.deferred():
                layers_w.flush()
                e2e_w.flush()

    layers = layers_w.combine(out_dir / LAYERS_FILE, transform=drift_corrected)
    e2e = e2e_w.combine(out_dir / E2E_FILE) if not cfg.layers_only else pd.DataFrame()
    rounds = sorted((out_dir / PARTS_DIR).glob("e2e_round-*.parquet"))
    if rounds:  # every raw end-to-end sample, with its round (the parts stay for a resume)
        write_parquet_atomic(pd.concat([read_part(p) for p in rounds], ignore_index=True), out_dir / SAMPLES_FILE)
    elastic.set_config(spec.full())
    noise = read_json(out_dir / NOISE_FILE) if (out_dir / NOISE_FILE).is_file() else {}
    # the session's CPU steal and other processes' load while the end-to-end rounds ran, per regime, beside
    # the device's identity (the per-round log stays in noise.json)
    load = {rk: {k: v for k, v in n["interference"].items() if k != "log"}
            for rk, n in noise.items() if isinstance(n.get("interference"), dict)}
    if load and (out_dir / DEVICE_FILE).is_file():
        write_json_atomic(out_dir / DEVICE_FILE, {**_read_state(out_dir / DEVICE_FILE, out_dir.parent),
                                                  "interference": load})
    anchors = layers[layers["anchor"] & (layers["status"] == "ok")] if len(layers) else layers
    drift = {}
    for rk, g in (anchors.groupby("regime") if len(anchors) else []):
        med = g["latency_ms_median"]
        drift[rk] = round(float(med.std() / med.mean()), 4) if len(med) > 1 else 0.0
    return {
        "device": info["device_name"],
        "regimes": [r.key for r in regimes],
        "layer_cells": int((~layers["anchor"]).sum()) if len(layers) else 0,
        "e2e_cells": int(len(e2e)),
        "cells_by_status": cells_by_status([layers, e2e], [r.key for r in regimes]),
        "measured_now": n_measured,
        "throttled_cells": int(layers["throttled"].fillna(False).sum()) if "throttled" in layers else 0,
        "anchor_cv": drift,
        "noise_floor_pct": {k: v["noise_floor_pct"] for k, v in noise.items()},
        "ratio_noise_floor_pct": {k: v["ratio_noise_floor_pct"] for k, v in noise.items()},
        "threads": threads,
    }


def _sweep_regime(elastic, regime: Regime, cfg: ProfileConfig, tele, base: dict, rng, done: set[str],
                  layers_w: PartWriter, e2e_w: PartWriter, source_gguf: Path | None, progress=None) -> int:
    """Measure the cells of one regime that are not `done`; returns how many were measured.
    `source_gguf`: the run's source GGUF file, for a llama.cpp regime."""
    import torch

    from profiler.timer import Timer, TimerConfig

    spec = elastic.spec
    rbase = {**base, "regime": regime.key, **regime.to_dict()}
    if regime.engine == "llamacpp":
        from profiler.sweep_llamacpp import sweep_llamacpp

        return sweep_llamacpp(elastic, regime, cfg, tele, rbase, done, layers_w, e2e_w, source_gguf, progress)
    elastic.to(device=cfg.device, dtype=getattr(torch, regime.dtype))
    timer = Timer(cfg.device, regime.mode, TimerConfig(warmup=cfg.warmup, min_reps=cfg.min_reps,
                                                       min_time_s=cfg.min_time_ms / 1e3))
    bench = RegimeBench(elastic, regime, cfg.device)
    n_measured = 0

    def measure(fn_factory, key, extra):
        nonlocal n_measured
        row = {**rbase, **extra, "cell_key": key}
        try:
            fn = fn_factory()
            before = tele.sample()
            timing = timer.measure(fn)
            after = tele.sample()
            row.update(timing.row(), status="ok")
            row.update({k: after[k] for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c",
                                              "throttle_reasons")})
            row["throttled"] = bool(before["throttled"] or after["throttled"])
            row["measured_at"] = time.time()  # when: the drift correction interpolates anchors in time
        except Exception as e:  # noqa: BLE001 - an OOM or capture failure is recorded, not fatal
            if not (_is_oom(e) or regime.mode == "cuda_graph"):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row.update(status="oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}",
                       latency_ms_median=float("nan"), n=0, samples_ms=[])
        n_measured += 1
        return row

    from flextron.bridges import used

    cells = _layer_cells(spec, [l for l in range(spec.num_layers) if used(elastic.bridges, l)])
    rng.shuffle(cells)  # random order: clock drift spreads over all widths instead of biasing some
    anchor = (0, "mlp", spec.mlp_widths[0][-1])
    todo = [c for c in cells if f"{regime.key}|{c[0]}|{c[1]}|{c[2]}" not in done]
    it = progress(todo, desc=f"layers {regime.key}") if progress else todo
    for idx, (layer, kind, width) in enumerate(it):
        key = f"{regime.key}|{layer}|{kind}|{width}"
        layers_w.add(measure(lambda: bench.cell_fn(layer, kind, width), key,
                             {"layer": layer, "kind": kind, "width": width, "anchor": False, "order": idx}))
        if (idx + 1) % cfg.anchor_every == 0:
            akey = f"{regime.key}|anchor|{time.time_ns()}"
            layers_w.add(measure(lambda: bench.cell_fn(*anchor), akey, {"layer": anchor[0], "kind": anchor[1],
                                                                        "width": anchor[2], "anchor": True,
                                                                        "order": idx}))
    layers_w.flush()
    e2e_timer = Timer(cfg.device, regime.mode, TimerConfig(warmup=cfg.e2e_warmup, min_reps=cfg.reps, min_time_s=0.0,
                                                           max_reps=cfg.reps))
    return n_measured + e2e_set(elastic, regime, cfg, tele, rbase, done, bench, e2e_timer, e2e_w, progress)


def e2e_set(elastic, regime: Regime, cfg: ProfileConfig, tele, rbase: dict, done: set[str], bench, timer,
             e2e_w: PartWriter, progress=None) -> int:
    """The end-to-end set (every uniform config, `e2e_random` random ones and, in the torch engine,
    `e2e_depth` that skip layers) in rounds, unless `--layers-only` or already measured; returns how
    many configs were measured now. (llama.cpp regimes have no whole-layer cells, so no depth.)"""
    e2e_cfgs = elastic.spec.uniform_configs() + random_configs(elastic.spec, cfg.e2e_random, cfg.seed)
    depth = depth_configs(elastic.spec, cfg.e2e_depth if regime.engine == "torch" else 0, cfg.seed)
    if not all(f"{regime.key}|{c.key}" in done for c in depth) and all(f"{regime.key}|{c.key}" in done
                                                                          for c in e2e_cfgs):
        depth = []  # a profile finished before depth existed: its set is complete as it was measured
    e2e_cfgs += depth
    if cfg.layers_only or all(f"{regime.key}|{c.key}" in done for c in e2e_cfgs):
        return 0
    return _e2e_rounds(elastic, regime, cfg, tele, rbase, e2e_cfgs, bench, timer, e2e_w, progress)


def drift_corrected(layers):
    """`layers` with `latency_ms_corrected`: each cell's median scaled by how far the anchor cell,
    re-measured through the sweep, had drifted when the cell was measured (linear in time between
    the anchors around it; the nearest one outside them). The layer cells' counterpart of the
    end-to-end set's same-round reference. Cells without anchors around them keep their median."""
    import numpy as np

    out = layers.copy()
    out["latency_ms_corrected"] = out["latency_ms_median"]
    if "measured_at" not in out.columns:
        return out
    for rk, g in out.groupby("regime"):
        a = g[g["anchor"] & (g["status"] == "ok") & g["measured_at"].notna()].sort_values("measured_at")
        if len(a) < 2:
            continue
        ref = float(a["latency_ms_median"].median())
        cells = g.index[g["measured_at"].notna() & ~g["anchor"]]
        level = np.interp(out.loc[cells, "measured_at"], a["measured_at"], a["latency_ms_median"])
        out.loc[cells, "latency_ms_corrected"] = out.loc[cells, "latency_ms_median"] * ref / level
    return out


def _probe(bench, timer, sub: SubnetConfig, regime: Regime) -> str:
    """"ok", or the status of a config that cannot run here: out of memory, or (under CUDA graphs) any
    capture error. Other errors are bugs and raise."""
    import torch

    try:
        with torch.inference_mode():
            timer.prepare(bench.forward_fn(sub))()
        return "ok"
    except Exception as e:  # noqa: BLE001 - recorded as the config's status, not fatal
        if not (_is_oom(e) or regime.mode == "cuda_graph"):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return "oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"


def _round_parts(folder: Path, regime: Regime) -> list[Path]:
    return sorted(folder.glob(f"e2e_round-{regime.slug}-*.parquet"))


def _e2e_rounds(elastic, regime: Regime, cfg: ProfileConfig, tele, rbase: dict, e2e_cfgs: list[SubnetConfig],
                bench, timer, e2e_w: PartWriter, progress=None) -> int:
    """The end-to-end set in `cfg.rounds` interleaved rounds (profiler/rounds.py): each round, every
    config and the full model once, in a fresh order; each finished round is written as one part, so
    an interrupted sweep resumes at the round in flight. Then one row per config (statistics over
    rounds, `ratio_to_full` with its bounds) goes to the e2e parts, and the split-half noise floor
    to noise.json. Configs that fail a first probe (OOM, or any error under CUDA graphs) get a row
    with their status and stay out of the rounds. Returns how many configs were measured now."""
    import pandas as pd

    from profiler.interference import CpuMonitor
    from profiler.interference import summary as interference_summary
    from profiler.interleaved import FULL
    from profiler.rounds import describe_refine, measure_in_rounds, noise_floor, refine, summarise

    spec = elastic.spec
    folder = e2e_w.folder
    full_key = spec.full().key
    by_key = {c.key: c for c in e2e_cfgs}
    done_rounds = pd.concat([read_part(p) for p in _round_parts(folder, regime)], ignore_index=True) \
        if _round_parts(folder, regime) else pd.DataFrame(columns=["round", "key", "latency_ms"])
    failed, n = {}, 0
    if not len(done_rounds):  # first start of this regime's rounds: probe every config once
        for c in e2e_cfgs:
            status = _probe(bench, timer, c, regime)
            if status != "ok":
                failed[c.key] = {"status": status}
    else:
        failed_keys = set(by_key) - set(done_rounds["key"])
        failed = {k: {"status": "error: failed its probe before an interrupted sweep; re-run with --restart"}
                  for k in failed_keys}
    keys = [k for k in by_key if k not in failed]

    def measure_one(key: str) -> list[float]:
        return timer.measure(bench.forward_fn(by_key[key])).samples_ms

    def write_round(rows: list[dict]) -> None:
        r = rows[0]["round"]
        df = pd.DataFrame(rows).assign(regime=regime.key)
        write_parquet_atomic(df, folder / f"e2e_round-{regime.slug}-{r:04d}.parquet")

    first = int(done_rounds["round"].max()) + 1 if len(done_rounds) else 0
    todo = cfg.rounds - done_rounds["round"].nunique() if len(done_rounds) else cfg.rounds
    rows = done_rounds.to_dict("records")
    monitor = CpuMonitor()
    seen: list[dict] = []  # per round: what else took the CPU (re-measured rounds marked rejected)
    if todo > 0 and full_key in keys:
        rows += measure_in_rounds(keys, measure_one, todo, seed=cfg.seed, first_round=first, on_round=write_round,
                                  progress=progress, desc=f"end-to-end {regime.key}", monitor=monitor, log=seen)
    elif full_key not in keys:
        raise FlextronError(f"the full model failed in {regime.key} ({failed[full_key]['status']}); "
                            "nothing can be measured relative to it")
    # then rounds where they pin a ratio down: the unsettled configs only, until the target floor or the cap
    rows, refined = refine(rows, measure_one, full_key, cfg.precision(), seed=cfg.seed, on_round=write_round,
                           progress=progress, desc=f"more rounds {regime.key}", monitor=monitor, log=seen)
    print(f"flextron profile: {regime.key}: {describe_refine(refined)}", file=sys.stderr)
    n = len(e2e_cfgs) if not len(done_rounds) else len(keys) if todo > 0 else 0  # cells (configs) measured now
    samples = pd.DataFrame(rows)
    samples["key"] = samples["key"].map(lambda k: FULL if k == full_key else k)
    stats = summarise(samples, FULL).set_index("key")
    noise = noise_floor(samples, FULL)
    noise["interference"] = {**interference_summary(seen), "note": monitor.note, "log": seen}
    noise["refine"] = refined
    # before the rows: once they are in the parts, a resume skips this regime and would never write it
    noises = read_json(folder.parent / NOISE_FILE) if (folder.parent / NOISE_FILE).is_file() else {}
    write_json_atomic(folder.parent / NOISE_FILE, {**noises, regime.key: noise})
    for c in e2e_cfgs:
        extra = {"config": c.to_json(), "config_key": c.key,
                 "uniform": not c.skip and c.is_uniform(), "skipped_layers": len(c.skip),
                 "params": c.param_count(spec), "flops": c.flops(spec, regime), "bytes": c.bytes_moved(spec, regime)}
        row = {**rbase, **extra, "cell_key": f"{regime.key}|{c.key}"}
        if c.key in failed:
            e2e_w.add({**row, "status": failed[c.key]["status"], "latency_ms_median": float("nan"), "n": 0,
                       "samples_ms": []})
            continue
        st = stats.loc[FULL if c.key == full_key else c.key]
        med_s = st["latency_ms_median"] / 1e3
        mine = samples[samples["key"] == (FULL if c.key == full_key else c.key)]
        row.update({k: v.item() if hasattr(v, "item") else v for k, v in st.items()},  # numpy scalars to Python
                   status="ok", samples_ms=[float(x) for x in mine["latency_ms"]],
                   achieved_tflops=extra["flops"] / med_s / 1e12, achieved_gbps=extra["bytes"] / med_s / 1e9)
        row.update({k: v for k, v in tele.sample().items() if k in ("sm_clock_mhz", "mem_clock_mhz", "power_w",
                                                                    "temp_c", "throttle_reasons")})
        row["energy_mj_per_token"] = (energy_per_token(tele, timer.prepare(bench.forward_fn(c)), regime, cfg.energy_s)
                                      if extra["uniform"] and cfg.energy_s > 0 else None)
        e2e_w.add(row)
    e2e_w.flush()
    return n


def profile(cfg: ProfileConfig) -> dict:
    """`flextron profile`: the sweep of `cfg.run`'s elastic model into RUN/profile (see `run_sweep`)."""
    from flextron.elastic import ElasticModel
    from flextron.progress import progress

    run = RunDir(cfg.run)
    check_device(cfg.device)  # before loading anything
    elastic = ElasticModel.load(run.require("elastic"))
    t0 = time.perf_counter()
    with pinned(cfg.pin_core, cfg.device, cfg.threads) as core:  # device.json records the core pinned to
        summary = run_sweep(elastic, profile_dir(run.root), dataclasses.replace(cfg, pin_core=-1 if core is None
                                                                                else core), progress=progress)
    return {**summary, "pinned_core": core, "seconds": round(time.perf_counter() - t0, 1)}

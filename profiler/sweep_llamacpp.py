"""The llama.cpp engine's sweep of one regime (`flextron profile --engine llamacpp`): per-layer terms
from probes timed in interleaved rounds beside the full model (profiler/llamacpp.py), then the
end-to-end set exactly as the torch engine measures it (profiler/sweep.py, the profile stage, calls it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from flextron.spec import Regime
from profiler.parts import PartWriter

if TYPE_CHECKING:
    from profiler.sweep import ProfileConfig


def sweep_llamacpp(elastic, regime: Regime, cfg: ProfileConfig, tele, rbase: dict, done: set[str],
                    layers_w: PartWriter, e2e_w: PartWriter, source_gguf: Path | None, progress=None) -> int:
    """One llama.cpp regime: per-layer terms from probes timed in interleaved rounds beside the full
    model (profiler/llamacpp.py), then the end-to-end set in rounds exactly as in the torch engine.
    `source_gguf`: the run's source GGUF (the exports copy its tokenizer), or None."""
    import torch

    from profiler.interleaved import FULL
    from profiler.llamacpp import LlamaCppBench, layer_terms, probe_keys
    from profiler.rounds import measure_in_rounds, summarise
    from profiler.sweep import e2e_set
    from profiler.timer import Timer, TimerConfig

    spec = elastic.spec
    elastic.to(device="cpu", dtype=torch.float32)
    timer = Timer("cpu", "eager", TimerConfig(warmup=cfg.warmup, min_reps=cfg.reps, min_time_s=0.0, max_reps=cfg.reps))
    n_measured = 0
    with LlamaCppBench(elastic, regime, threads=cfg.threads or 1, source_gguf=source_gguf) as bench:
        cells = [(kind, w) for kind, w in probe_keys(spec) if w]
        keys = [f"{regime.key}|{layer}|{kind}|{w}" for layer in range(spec.num_layers) for kind, w in cells]
        if not all(k in done for k in keys):
            probes = {f"{kind}:{w}": (kind, w) for kind, w in probe_keys(spec)}

            def measure_probe(key: str) -> list[float]:
                fn = bench.forward_fn(spec.full()) if key == FULL else bench.probe_fn(*probes[key])
                return timer.measure(fn).samples_ms

            rows = measure_in_rounds([FULL, *probes], measure_probe, cfg.rounds, seed=cfg.seed, progress=progress,
                                     desc=f"probes {regime.key}")
            st = summarise(rows, FULL).set_index("key")
            full_ms = float(st.loc[FULL, "latency_ms_median"])
            times = {probes[k]: float(st.loc[k, "ratio_to_full"]) * full_ms for k in probes}
            terms = layer_terms(times, spec)
            now = time.time()
            for idx, (kind, w) in enumerate(cells):
                for layer in range(spec.num_layers):
                    ms = terms[(kind, w)]
                    layers_w.add({**rbase, "cell_key": f"{regime.key}|{layer}|{kind}|{w}", "layer": layer,
                                  "kind": kind, "width": w, "anchor": False, "order": idx, "status": "ok",
                                  "latency_ms_median": ms, "latency_ms_corrected": ms, "n": int(st.loc[
                                      f"{kind}:{w}", "n"]), "probe_ms": times[(kind, w)], "measured_at": now})
                n_measured += 1
            layers_w.flush()
        return n_measured + e2e_set(elastic, regime, cfg, tele, rbase, done, bench, timer, e2e_w, progress)

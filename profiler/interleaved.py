"""One regime's end-to-end measurements in interleaved rounds, in the regime's engine: the model's
own transformers code (`RegimeBench`), or its GGUF exports in llama.cpp (`LlamaCppBench`).

`InterleavedSession` holds a bench and a Timer for one regime and adds rounds over any set of
sub-networks: the full model (key `full`, the reference) is in every round, the order is shuffled
per round, and raw samples keep their round (see `profiler/rounds.py`). The profile's end-to-end
set, verify, the routers' serving choice and the benchmarks all measure through it. A key may come
with a setup (a context manager factory entered around its measurement, e.g. one that installs
dynamic routing), and the inputs may be real `text` (see `RegimeBench`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from flextron.errors import FlextronError
from flextron.spec import Regime, SubnetConfig
from profiler.interference import CpuMonitor

FULL = "full"


class InterleavedSession:
    def __init__(self, elastic, regime: Regime, device: str, reps: int, warmup: int, seed: int = 0,
                 threads: int | None = None, source_gguf=None, text=None):
        import torch

        from profiler.bench import RegimeBench
        from profiler.timer import Timer, TimerConfig

        if regime.engine == "llamacpp":
            from profiler.llamacpp import LlamaCppBench

            if device != "cpu":
                raise FlextronError(f"regime {regime.key} runs in llama.cpp on the CPU; pass --device cpu")
            elastic.to(device="cpu", dtype=torch.float32)
            self.bench = LlamaCppBench(elastic, regime, threads=threads or 1, source_gguf=source_gguf)
        else:
            elastic.to(device=device, dtype=getattr(torch, regime.dtype))
            self.bench = RegimeBench(elastic, regime, device, text=text)
        self.timer = Timer(device, regime.mode, TimerConfig(warmup=warmup, min_reps=reps, min_time_s=0.0,
                                                            max_reps=reps))
        self.regime, self.seed = regime, seed
        self.configs: dict[str, SubnetConfig] = {FULL: elastic.spec.full()}
        self.full_key = elastic.spec.full().key  # the full model is the reference: one key, measured once a round
        self.samples: list[dict] = []
        self.monitor = CpuMonitor()  # what else took the CPU in each round; bursts are measured again
        self.interference: list[dict] = []
        self.rounds_of: dict[str, int] = {}
        self.setups: dict = {}

    def close(self) -> None:
        """Free what the engine holds (llama.cpp's loaded models and their GGUF files)."""
        if hasattr(self.bench, "close"):
            self.bench.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _measure(self, key: str) -> list[float]:
        with self.setups.get(key, contextlib.nullcontext)():
            return self.timer.measure(self.bench.forward_fn(self.configs[key])).samples_ms

    def run(self, subs: dict[str, SubnetConfig], rounds: int, progress=None, setups: dict | None = None) -> list[dict]:
        """`rounds` more rounds over `subs` and the full model; returns the new raw rows. `setups`
        maps a key to a zero-argument context manager factory entered around each of its measurements."""
        from profiler.rounds import measure_in_rounds

        subs = {k: v for k, v in subs.items() if k not in (FULL, self.full_key)}
        self.configs.update(subs)
        self.setups.update(setups or {})
        keys = [FULL] + list(subs)
        first = self.rounds_of.get(FULL, 0)  # the full model is in every round: its count numbers them
        rows = measure_in_rounds(keys, self._measure, rounds, seed=self.seed, first_round=first, progress=progress,
                                 monitor=self.monitor, log=self.interference)
        rows = [{**r, "regime": self.regime.key} for r in rows]
        self.samples += rows
        for k in keys:
            self.rounds_of[k] = self.rounds_of.get(k, 0) + rounds
        return rows

    def refine(self, precision, progress=None) -> dict:
        """More rounds where they pin a ratio down, over the keys measured so far, until the ratio noise
        floor reaches `precision` (a profiler.rounds.Precision: target, most rounds, time cap); returns
        what `profiler.rounds.refine` records (floor before and after, rounds added, why it stopped)."""
        from profiler.rounds import refine

        rows, rec = refine(self.samples, self._measure, FULL, precision, seed=self.seed, progress=progress,
                           monitor=self.monitor, log=self.interference)
        new = [{**r, "regime": self.regime.key} for r in rows[len(self.samples):]]
        self.samples += new
        for k in {r["key"] for r in new}:
            self.rounds_of[k] = self.rounds_of.get(k, 0) + len({r["round"] for r in new if r["key"] == k})
        return rec

    def interference_summary(self) -> dict:
        """The session's steal and other-process CPU (median, max) and its re-measured rounds."""
        from profiler.interference import summary

        return {**summary(self.interference), "note": self.monitor.note}

    def key_of(self, key: str) -> str:
        return FULL if key == self.full_key else key

    def stats(self, key: str, quantile: str, budget_frac: float, confidence: float | None = None) -> dict:
        """`key`'s compliance verdict against `budget_frac` at `quantile` (one-sided `confidence`,
        default profiler.rounds.CONFIDENCE), and its latency quantiles."""
        from profiler.rounds import CONFIDENCE, compliance, per_round, tail_ratio

        key = self.key_of(key)
        samples = [s for s in self.samples if s["key"] in (key, FULL)]
        rt = per_round(samples, FULL)
        mine = rt[rt["key"] == key]
        confidence = CONFIDENCE if confidence is None else confidence
        verdict = compliance(*tail_ratio(samples, key, FULL, quantile, seed=self.seed, confidence=confidence),
                             budget_frac, confidence)
        vals = np.asarray([s["latency_ms"] for s in self.samples if s["key"] == key], float)
        full = rt[rt["key"] == FULL]["median_ms"]
        return {**verdict, "rounds": int(len(mine)), "measured_latency_ms": float(mine["median_ms"].median()),
                "latency_ms_p50": float(np.quantile(vals, 0.5)), "latency_ms_p90": float(np.quantile(vals, 0.9)),
                "latency_ms_p99": float(np.quantile(vals, 0.99)), "reference_full_ms": float(full.median())}

    def ratios(self) -> dict[str, dict]:
        """Per key: `measured_ms` (median over rounds of its round medians) and `ratio_to_full` (median
        over rounds of its round median over the full model's in the same round)."""
        from profiler.rounds import per_round

        rt = per_round(self.samples, FULL)
        return {k: {"measured_ms": float(g["median_ms"].median()), "ratio_to_full": float(g["ratio_to_full"].median()),
                    "rounds": int(len(g))} for k, g in rt.groupby("key")}

    def reference_ms(self) -> float:
        """The full model's median step over every round so far: this session's Budget reference."""
        from profiler.rounds import per_round

        rt = per_round([s for s in self.samples if s["key"] == FULL], FULL)
        return float(rt["median_ms"].median())

"""The one timer every measurement goes through.

CPU: `perf_counter` around each call. CUDA: events around each call, with a large buffer written
before every repetition so weights start cold in L2 the way they are in a real model (an H100's
50 MB L2 would otherwise hold a small layer's weights and make it look several times faster).
`cuda_graph` mode captures the call once and times graph replays: decode-sized work is dominated
by kernel-launch overhead in eager mode, and a graph is how it is deployed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)


def default_e2e_warmup(device: str, engine: str = "torch") -> int:
    """Untimed steps before an end-to-end config's timed ones in a round, besides the one that fills its cache:
    none for the torch engine on the CPU (a decode step's first one after another config measured no slower
    than the rest: benchmarks/e2e_warmup.py), one elsewhere (a CUDA graph's first replay, llama.cpp's first
    call)."""
    return 0 if engine == "torch" and device == "cpu" else 1


@dataclass(frozen=True)
class TimerConfig:
    warmup: int = 3
    min_reps: int = 10
    min_time_s: float = 0.05
    max_reps: int = 2000
    flush_l2: bool = True


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 10))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    @property
    def cv(self) -> float:
        a = np.asarray(self.samples_ms)
        return float(a.std() / a.mean()) if a.mean() > 0 else 0.0

    def row(self) -> dict:
        return {
            "latency_ms_median": self.median_ms,
            "latency_ms_p10": self.p10_ms,
            "latency_ms_p90": self.p90_ms,
            "latency_ms_p99": self.p99_ms,
            "latency_ms_mean": float(np.mean(self.samples_ms)),
            "n": len(self.samples_ms),
            "cv": self.cv,
            "samples_ms": [float(s) for s in self.samples_ms],
        }


class Timer:
    """Times a zero-argument callable on `device` ("cpu" or "cuda[:N]") in `mode` ("eager" or "cuda_graph")."""

    def __init__(self, device: str = "cpu", mode: str = "eager", cfg: TimerConfig = TimerConfig()):
        self.device = torch.device(device)
        self.mode = mode
        self.cfg = cfg
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("cuda_graph mode needs a CUDA device; use --mode eager on CPU")
        self._flush = None
        if self.device.type == "cuda" and cfg.flush_l2:
            self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=self.device)

    def _graph(self, fn):
        """Capture `fn` into a CUDA graph after warming it up on a side stream (as PyTorch requires)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.cfg.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def prepare(self, fn):
        """`fn` as this mode runs it: the callable itself, or the replay of its captured CUDA graph."""
        with torch.inference_mode():
            return self._graph(fn) if self.mode == "cuda_graph" else fn

    def measure(self, fn) -> Timing:
        """Run `fn` until both min_reps and min_time_s are reached (capped at max_reps)."""
        with torch.inference_mode():
            fn = self.prepare(fn)
            for _ in range(self.cfg.warmup):
                fn()
            if self.device.type == "cuda":
                return self._measure_cuda(fn)
            return self._measure_cpu(fn)

    def _measure_cpu(self, fn) -> Timing:
        t = Timing()
        start = time.perf_counter()
        while len(t.samples_ms) < self.cfg.max_reps and (
            len(t.samples_ms) < self.cfg.min_reps or time.perf_counter() - start < self.cfg.min_time_s
        ):
            t0 = time.perf_counter()
            fn()
            t.samples_ms.append((time.perf_counter() - t0) * 1e3)
        return t

    def _measure_cuda(self, fn) -> Timing:
        t = Timing()
        spent = 0.0
        while len(t.samples_ms) < self.cfg.max_reps and (
            len(t.samples_ms) < self.cfg.min_reps or spent < self.cfg.min_time_s
        ):
            # A batch of reps with one sync, so host-side timing never enters the samples.
            batch = max(1, min(self.cfg.min_reps, self.cfg.max_reps - len(t.samples_ms)))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(batch)]
            for start, end in events:
                if self._flush is not None:
                    self._flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(self.device)
            for start, end in events:
                ms = start.elapsed_time(end)
                t.samples_ms.append(ms)
                spent += ms / 1e3
        return t

"""What else took the CPU while a round was timed, and which rounds to measure again for it.

A 2-core cloud VM loses time to the hypervisor (steal) and to other processes; either inflates the
configs timed while it happens, and on a small box a burst lasting one round moves that round's
ratios by more than the widths being compared. `CpuMonitor` reads the machine's CPU counters
(`/proc/stat` on Linux) and this process's own CPU time around each round and gives, per round:

- `steal_pct`: the share of the machine's CPU time the hypervisor took (steal);
- `other_pct`: the share of the machine's CPU time busy in other processes (busy time minus ours).

`flag(history, current)` says whether a round's interference is far above the session's typical level
(the median of the rounds so far plus `max(min_excess_pct, 4 x their MAD)`), in which case the round
is measured again (bounded; see `profiler/rounds.py`). Where `/proc/stat` does not exist the monitor
says so once (`note`) and observes nothing: measuring goes on without it.

Engine-agnostic and torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROC_STAT = Path("/proc/stat")
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def parse_proc_stat(text: str) -> dict[str, int]:
    """The machine-wide `cpu` line of /proc/stat as {field: clock ticks} (fields a kernel lacks are 0)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            return {name: values[i] if i < len(values) else 0 for i, name in enumerate(FIELDS)}
    raise ValueError("no aggregate `cpu` line")


def _busy(c: dict[str, int]) -> int:
    return sum(c[f] for f in ("user", "nice", "system", "irq", "softirq"))


def interference(before: dict[str, int], after: dict[str, int], own_s: float, tick_s: float) -> dict:
    """Steal and other processes' CPU, in percent of the machine's CPU time between two snapshots, given
    the CPU seconds this process used in between (`own_s`) and the length of a clock tick."""
    d = {f: after[f] - before[f] for f in FIELDS}
    total = sum(d.values())
    if total <= 0:
        return {"steal_pct": 0.0, "other_pct": 0.0}
    other = max(_busy(d) - own_s / tick_s, 0.0)
    return {"steal_pct": round(100.0 * d["steal"] / total, 3), "other_pct": round(100.0 * other / total, 3)}


@dataclass
class CpuMonitor:
    """Per-round CPU interference on Linux; a note and nothing observed elsewhere."""

    path: Path = PROC_STAT
    min_excess_pct: float = 10.0  # a round is flagged only this far above the typical level, at least
    note: str | None = None
    _start: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.path = Path(self.path)
        try:
            parse_proc_stat(self.path.read_text())
            self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError) as e:
            self.note = f"CPU interference not observed: {self.path} unreadable ({type(e).__name__})"

    @property
    def available(self) -> bool:
        return self.note is None

    def start(self) -> None:
        if self.available:
            t = os.times()
            self._start = (parse_proc_stat(self.path.read_text()), t.user + t.system)

    def stop(self) -> dict | None:
        """Interference since `start()`; None when nothing is observed."""
        if not self.available or self._start is None:
            return None
        before, own0 = self._start
        t = os.times()
        self._start = None
        return interference(before, parse_proc_stat(self.path.read_text()), t.user + t.system - own0, self.tick_s)

    def flag(self, history: list[dict], current: dict | None) -> bool:
        """Whether `current` is far above the typical level of `history` (earlier accepted rounds)."""
        if current is None or len(history) < 2:
            return False
        level = np.array([h["steal_pct"] + h["other_pct"] for h in history])
        now = current["steal_pct"] + current["other_pct"]
        typical = float(np.median(level))
        mad = float(np.median(np.abs(level - typical)))
        return now > typical + max(self.min_excess_pct, 4.0 * mad)


def summary(log: list[dict]) -> dict:
    """A session's interference: median and max steal and other-process CPU over its accepted rounds,
    and how many rounds were measured again for a burst."""
    acc = [r for r in log if not r.get("rejected")]
    out = {"rounds": len(acc), "remeasured_rounds": sum(1 for r in log if r.get("rejected"))}
    for k in ("steal_pct", "other_pct"):
        vals = [r[k] for r in acc if r.get(k) is not None]
        out[f"{k}_median"] = round(float(np.median(vals)), 3) if vals else None
        out[f"{k}_max"] = round(float(np.max(vals)), 3) if vals else None
    return out

"""Resumable, atomic, interrupt-safe Parquet parts: how a long measurement keeps its finished rows.

A `PartWriter` buffers rows and writes them as numbered Parquet parts (temp file + rename, so a
part is whole or absent), every FLUSH_S seconds, every `flush_every` rows and when the work is
interrupted. Within `Interrupts`, SIGINT and SIGTERM raise KeyboardInterrupt so `finally` blocks
can flush, except while a part is being written (`Interrupts.deferred`). A resumed run reads the
keys of the cells already in the parts (`PartWriter.done_keys`) and measures only the others; a
SIGKILL, which nothing can catch, loses at most FLUSH_S seconds of finished rows.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from flextron.errors import FlextronError
from flextron.rundir import write_parquet_atomic

FLUSH_S = 5.0  # buffered rows are written at least this often, so a SIGKILL loses only seconds of work


class Interrupts:
    """For the duration of a sweep, SIGINT and SIGTERM raise KeyboardInterrupt (so `finally` blocks
    write the buffered rows; SIGTERM would otherwise end the process on the spot), except inside
    `deferred()`, where they wait for the block's end: a signal between a part's rename and the
    clearing of its buffer would write those rows twice. Handlers can only be set from the main
    thread; elsewhere signals keep their usual effect."""

    def __init__(self):
        self._depth, self._pending, self._previous = 0, None, {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. nohup: leave ignored signals ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self._depth:
            self._pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                signum, self._pending = self._pending, None
                raise KeyboardInterrupt(signal.Signals(signum).name)


def read_part(path: Path, columns: list[str] | None = None):
    """One part as a DataFrame; a damaged one is a FlextronError saying to delete it and resume."""
    import pandas as pd

    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise FlextronError(
            f"{path} is a corrupt part of an interrupted sweep ({type(e).__name__}: {str(e)[:160]}); delete it and "
            "run the same `flextron profile` command again: its cells are measured again"
        ) from None


class PartWriter:
    """Rows go to numbered Parquet parts (temp file + rename, never half a part), written when
    `flush_every` rows or `flush_s` seconds have gathered, and by `flush()` (which the sweep calls
    when it is interrupted). Every row carries a `cell_key`."""

    def __init__(self, folder: Path, prefix: str, flush_every: int = 16, flush_s: float | None = None,
                 guard=contextlib.nullcontext):
        self.folder, self.prefix, self.flush_every = folder, prefix, flush_every
        self.flush_s = FLUSH_S if flush_s is None else flush_s
        self.guard = guard  # a context in which the part is written and the buffer cleared, uninterrupted
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{prefix}-*.tmp"):  # a write that a kill cut short; its rows were never counted
            stale.unlink()
        self.rows: list[dict] = []
        self._flushed_at = time.monotonic()

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}-*.parquet"))

    def done_keys(self) -> set[str]:
        keys = set()
        for p in self.parts():
            keys.update(read_part(p, ["cell_key"])["cell_key"])
        return keys

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_every or time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        import pandas as pd

        self._flushed_at = time.monotonic()
        if not self.rows:
            return
        with self.guard():
            n = len(self.parts())
            path = self.folder / f"{self.prefix}-{n:05d}-{time.time_ns()}.parquet"
            tmp = path.with_suffix(".tmp")
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)
            tmp.rename(path)
            self.rows = []

    def combine(self, out: Path, transform=None) -> "pd.DataFrame":  # noqa: F821
        """Every part as one table (last row per cell), `transform`ed, written to `out`."""
        import pandas as pd

        parts = self.parts()
        df = pd.concat([read_part(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
        if len(df):
            df = df.drop_duplicates("cell_key", keep="last")
            df = transform(df) if transform else df
            write_parquet_atomic(df, out)
        return df

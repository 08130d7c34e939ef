"""File-system helpers that import nothing else of flextron: one safe file-name component, and an
exclusive lock for read-modify-write of shared files. `flextron.rundir` re-exports both; the model
loaders and the spec use them from here, so neither imports the run directory."""

from __future__ import annotations

import contextlib
import fcntl
import re
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def safe_name(text: str) -> str:
    """`text` as one file-name component (regime keys, device names): never a path separator,
    never `..`, so a crafted string in an artifact cannot steer a write outside the run."""
    name = _SAFE.sub("_", str(text)).strip("._") or "_"
    return name[:120]


@contextlib.contextmanager
def file_lock(lock_path: str | Path):
    """An exclusive lock on `lock_path` (created if missing) for the duration of the block, for
    read-modify-write of artifacts that several processes share (a model cache entry, one search's
    results written by many workers). The lock file is never removed: removing it would let a
    third process lock a different inode."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

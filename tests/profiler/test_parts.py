import os
import signal
import time

import pandas as pd
import pytest

from flextron.errors import FlextronError
from profiler.parts import Interrupts, PartWriter, read_part


def test_interrupts_wait_for_a_part_being_written():
    reached = False
    with Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here, and must not raise yet
                reached = True
    assert reached
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the sweep


def test_parts_are_written_every_few_seconds(tmp_path):
    """So a SIGKILL (which nothing can catch) loses only seconds of finished cells."""
    row = {"cell_key": "a", "latency_ms_median": 1.0}
    slow = PartWriter(tmp_path / "slow", "layers", flush_every=100, flush_s=3600)
    slow.add(row)
    assert not slow.parts()
    timed = PartWriter(tmp_path / "timed", "layers", flush_every=100, flush_s=0.0)
    timed.add(row)
    timed.add({**row, "cell_key": "b"})
    assert len(timed.parts()) == 2 and timed.done_keys() == {"a", "b"}


def test_a_flushed_row_is_written_once_and_combined_last_wins(tmp_path):
    """Each row lands in exactly one part (the buffer is cleared with the write); a cell measured
    again (a resume after a corrupt part) is combined as its last row."""
    w = PartWriter(tmp_path / "parts", "layers", flush_every=2, flush_s=3600)
    for key, ms in [("a", 1.0), ("b", 2.0), ("c", 3.0)]:
        w.add({"cell_key": key, "latency_ms_median": ms})
    w.flush()
    w.flush()  # nothing buffered: no empty part
    raw = pd.concat([read_part(p) for p in w.parts()], ignore_index=True)
    assert len(w.parts()) == 2 and sorted(raw["cell_key"]) == ["a", "b", "c"]
    w.add({"cell_key": "a", "latency_ms_median": 9.0})
    w.flush()
    out = w.combine(tmp_path / "layers.parquet")
    assert out.set_index("cell_key")["latency_ms_median"].to_dict() == {"a": 9.0, "b": 2.0, "c": 3.0}
    assert pd.read_parquet(tmp_path / "layers.parquet").equals(out.reset_index(drop=True))


def test_a_write_cut_short_by_a_kill_is_dropped_and_a_damaged_part_named(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "layers-00000-1.tmp").write_bytes(b"half a part")  # killed between write and rename
    w = PartWriter(folder, "layers")
    assert not list(folder.glob("*.tmp")) and w.done_keys() == set()
    w.add({"cell_key": "a"})
    w.flush()
    part = w.parts()[0]
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(FlextronError, match=rf"{part.name} is a corrupt part.*delete it.*measured again"):
        w.done_keys()

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from flextron.errors import FlextronError
from flextron.rundir import (
    RunDir,
    check_resume,
    fresh_tmp_dir,
    read_json,
    read_parquet,
    recover_swap,
    safe_name,
    save_stage_config,
    swap_in,
    write_json_atomic,
)


def _folder(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "w.txt").write_text(text)


@pytest.mark.parametrize("kill_at", ["after_first_rename", "before_renames", "after_swap"])
def test_swap_recovers_from_a_kill_at_any_point(tmp_path, kill_at):
    """A real SIGKILL between the swap's steps; the next start sees one whole version, never none."""
    folder = tmp_path / "ckpt"
    _folder(folder, "old")
    tmp = fresh_tmp_dir(folder)
    (tmp / "w.txt").write_text("new")
    script = textwrap.dedent(f"""
        import os, signal, shutil
        from pathlib import Path
        import flextron.rundir as rd
        folder, tmp = Path({str(folder)!r}), Path({str(tmp)!r})
        real_rename = Path.rename
        calls = []
        def rename(self, target):
            calls.append(self)
            if {kill_at!r} == "before_renames":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real_rename(self, target)
            if {kill_at!r} == "after_first_rename" and len(calls) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if {kill_at!r} == "after_swap" and len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        Path.rename = rename
        rd.swap_in(tmp, folder)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    recover_swap(folder)
    assert (folder / "w.txt").read_text() == ("old" if kill_at == "before_renames" else "new")
    assert not (tmp_path / "ckpt.old").exists() and not (folder / ".complete").exists()


def test_a_half_written_tmp_never_wins(tmp_path):
    folder = tmp_path / "f"
    _folder(folder.with_name("f.old"), "old")  # killed after folder -> old, tmp not marked complete
    _folder(folder.with_name("f.tmp"), "half")
    assert recover_swap(folder) == "restored" and (folder / "w.txt").read_text() == "old"


def test_swap_replaces(tmp_path):
    folder = tmp_path / "f"
    _folder(folder, "old")
    tmp = fresh_tmp_dir(folder)
    (tmp / "w.txt").write_text("new")
    swap_in(tmp, folder)
    assert (folder / "w.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@dataclass(frozen=True)
class _Cfg:
    steps: int = 4
    lr: float = 0.1
    regime: tuple[str, ...] = ("a",)


def test_check_resume_names_the_flag_that_differs(tmp_path):
    save_stage_config(tmp_path / "c.json", _Cfg())
    assert check_resume(tmp_path / "c.json", _Cfg(), ("steps", "lr", "regime"))["steps"] == 4
    with pytest.raises(FlextronError, match=r"--lr 0.1, now 0.2.*--restart"):
        check_resume(tmp_path / "c.json", _Cfg(lr=0.2), ("steps", "lr"))
    with pytest.raises(FlextronError, match="--regime a, now a b"):
        check_resume(tmp_path / "c.json", _Cfg(regime=("a", "b")), ("regime",))
    check_resume(tmp_path / "c.json", _Cfg(lr=0.2), ("steps",))  # not a resume-relevant field


def test_corrupt_artifacts_name_the_file_and_the_command(tmp_path):
    run = tmp_path / "run"
    (run / "latency_model").mkdir(parents=True)
    (run / "latency_model" / "metrics.json").write_text("{trunc")
    with pytest.raises(FlextronError, match=r"metrics.json is corrupt.*flextron fit --run"):
        read_json(run / "latency_model" / "metrics.json", run)
    (run / "profile").mkdir()
    (run / "profile" / "e2e.parquet").write_bytes(b"PAR1\x00garbage")
    with pytest.raises(FlextronError, match=r"e2e.parquet is corrupt.*flextron profile --run"):
        read_parquet(run / "profile" / "e2e.parquet", run)
    (run / "latency_model" / "metrics.json").write_text("[1, 2]")
    with pytest.raises(FlextronError, match="expected a JSON dict"):
        read_json(run / "latency_model" / "metrics.json", run)


def test_json_writes_refuse_nan_and_keep_the_old_file(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1.0})
    with pytest.raises(FlextronError, match="NaN or infinite"):
        write_json_atomic(tmp_path / "a.json", {"x": float("nan")})
    assert read_json(tmp_path / "a.json") == {"x": 1.0}


def test_safe_name_cannot_escape():
    for evil in ("../../etc/x", "a/b", "..", "/abs", "x\x00y", "<script>"):
        name = safe_name(evil)
        assert "/" not in name and name not in ("", ".", "..") and "<" not in name


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FlextronError, match="is a file"):
        RunDir(tmp_path / "f")
    assert os.path.isfile(tmp_path / "f")


def test_concurrent_rebuilds_of_one_folder_take_turns_and_each_swaps_in_whole(tmp_path):
    """Builders of one folder never share (and delete) each other's half-built `.tmp`: each writes a
    whole version, they take turns, and the folder ends as one builder's complete version."""
    import threading
    import time

    from flextron.rundir import rebuild

    folder = tmp_path / "verify"
    errors = []

    def build(name):
        try:
            with rebuild(folder) as tmp:
                for i in range(5):
                    (tmp / f"part{i}.txt").write_text(name)
                    time.sleep(0.01)  # another builder, unlocked, would wipe this .tmp here
        except Exception as e:  # noqa: BLE001 -- any failure of a builder fails the test
            errors.append(e)

    threads = [threading.Thread(target=build, args=(f"builder{j}",)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    texts = {p.read_text() for p in folder.glob("part*.txt")}
    assert len(list(folder.glob("part*.txt"))) == 5 and len(texts) == 1  # one builder's whole version
    assert not folder.with_name("verify.tmp").exists() and not folder.with_name("verify.old").exists()


def test_a_rebuild_that_fails_keeps_the_old_version_and_carries_over_what_it_does_not_rebuild(tmp_path):
    from flextron.rundir import rebuild

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "lookup.json").write_text("old")
    (folder / "notes.txt").write_text("kept")
    with pytest.raises(RuntimeError):
        with rebuild(folder, only=("lookup.json",)) as tmp:
            (tmp / "lookup.json").write_text("half")
            raise RuntimeError("killed")
    assert (folder / "lookup.json").read_text() == "old"
    with rebuild(folder, only=("lookup.json",)) as tmp:
        (tmp / "lookup.json").write_text("new")
    assert (folder / "lookup.json").read_text() == "new" and (folder / "notes.txt").read_text() == "kept"

"""The run directory: one folder per run, one sub-folder per stage, each stage's config beside it.

Everything here keeps a run directory truthful: one list of stages (so `convert --overwrite` can
remove every stage built on the old weights), crash-safe folder swaps, stage configs saved when a
stage starts and compared when it resumes, and readers that name a corrupt file and the command
that rebuilds it instead of raising a library traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from flextron.errors import FlextronError
from flextron.paths import file_lock, safe_name  # noqa: F401 - re-exported: part of the run-directory API

# Every stage folder, in pipeline order -> the command that creates it (named in errors when a
# later stage runs too early or an artifact is corrupt). Everything after `elastic` is built on
# the converted weights, so `convert --overwrite` removes all of them.
STAGES = {
    "elastic": "flextron convert --model MODEL --out {run}",
    "train": "flextron train --run {run}",
    "trained": "flextron train --run {run}",
    "data": "flextron synth --run {run}",
    "profile": "flextron profile --run {run} --regime REGIME",
    "latency_model": "flextron fit --run {run}",
    "quality": "flextron quality --run {run}",
    "router": "flextron route --run {run} --regime REGIME",
    "search": "flextron search --run {run} --regime REGIME --budget-ms X",
    "verify": "flextron verify --run {run}",
    "export": "flextron export --run {run} --lookup",
    "reports": "flextron report --run {run}",
}
WEIGHTS = ("auto", "elastic", "trained")
COMPLETE_MARKER = ".complete"  # written last into a folder about to be swapped in


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FlextronError(
                f"run directory {self.root} is a file, not a directory; pass a directory to --run/--out"
            )

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    @property
    def elastic(self) -> Path:
        path = self.root / "elastic"
        if not path.exists():
            recover_swap(path)  # a convert killed mid-swap
        return path

    def weights(self, choice: str = "auto") -> tuple[str, Path]:
        """Which elastic weights a stage uses: `elastic` (one-shot, as converted), `trained` (after
        `flextron train`), or `auto` (trained when it exists). Returns (name, folder)."""
        if choice not in WEIGHTS:
            raise FlextronError(f"--weights must be one of {list(WEIGHTS)}, got {choice!r}")
        recover_swap(self.root / "trained")
        if choice == "auto":
            choice = "trained" if (self.root / "trained" / "config.json").is_file() else "elastic"
        return choice, self.require(choice)

    def source_gguf(self) -> Path | None:
        """The GGUF file this run was converted from (built-in real models and `.gguf` sources), else
        None: a GGUF export copies its tokenizer from there."""
        from flextron.models import source_gguf

        model = (
            read_json(self.root / "convert_config.json", self.root).get("model", "")
            if (self.root / "convert_config.json").is_file()
            else ""
        )
        return source_gguf(model) if model else None

    def weights_tag(self, name: str) -> str:
        """`name` plus an identity of the weights' current files for `trained` (which `flextron train`
        rewrites): quality caches, Optuna studies and routers keyed by it never serve losses measured
        on an earlier training run's weights. One-shot weights change only with `convert --overwrite`,
        which removes every later stage, so `elastic` needs no identity."""
        if name == "elastic":
            return name
        import hashlib

        files = sorted((self.root / name).glob("*.safetensors"))
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:8]}"

    def require(self, stage: str, marker: str | None = None) -> Path:
        """The stage folder, or a FlextronError naming the command that makes it."""
        path = self.root / stage
        if not path.exists():
            recover_swap(path)
        check = path / marker if marker else path
        if not check.exists():
            raise FlextronError(f"{check} does not exist yet; run `{rebuild_command(self.root, path)}` first")
        return path

    def corpus(self, corpus: str = "") -> str:
        """The text corpus a stage uses: `corpus` when given, else the one the run was converted with
        (so calibration, training, search and routing read the same text unless told otherwise)."""
        from flextron.data import BUILTIN_CORPUS, resolve_corpus

        if corpus:
            return resolve_corpus(corpus)

        path = self.root / "convert_config.json"
        return read_json(path, self.root).get("corpus") or BUILTIN_CORPUS if path.is_file() else BUILTIN_CORPUS

    def remove_stages_after_convert(self) -> list[str]:
        """Remove every stage built on the converted weights (they would describe the old model)."""
        removed = []
        for stage in STAGES:
            if stage == "elastic":
                continue
            for path in (self.root / stage, *self.root.glob(f"{stage}.tmp*"), *self.root.glob(f"{stage}.old*")):
                if path.exists():
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed.append(path.name)
        return removed


def rebuild_command(run_root: str | Path, path: str | Path) -> str:
    """The command that (re)builds `path` inside run `run_root`, from the stage folder it lies in."""
    run_root, path = Path(run_root), Path(path)
    try:
        stage = path.resolve().relative_to(run_root.resolve()).parts[0]
    except (ValueError, IndexError):
        stage = ""
    return STAGES.get(stage, f"the stage that writes {path.name}").format(run=run_root)


# ---- reading artifacts ------------------------------------------------------------------------------
def corrupt_error(path: str | Path, run_root, err: Exception | str) -> FlextronError:
    """The error for a corrupt artifact: its path, what is wrong, and the command that rebuilds it."""
    path = Path(path)
    why = err if isinstance(err, str) else f"{type(err).__name__}: {str(err)[:160]}"
    fix = f"rebuild it with `{rebuild_command(run_root, path)}`" if run_root is not None else "rebuild it"
    return FlextronError(f"{path} is corrupt or unreadable ({why}); {fix}")


def read_json(path: str | Path, run_root: str | Path | None = None, expect: type = dict):
    """A JSON artifact, or a FlextronError naming the file and the command that rebuilds it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise corrupt_error(path, run_root, e) from None
    if not isinstance(obj, expect):
        raise corrupt_error(path, run_root, TypeError(f"expected a JSON {expect.__name__}, got {type(obj).__name__}"))
    return obj


def read_parquet(path: str | Path, run_root: str | Path | None = None, columns: list[str] | None = None):
    """A Parquet artifact, or a FlextronError naming the file and the command that rebuilds it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        df = pd.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise corrupt_error(path, run_root, e) from None
    return df


def require_columns(df, path: str | Path, columns, run_root: str | Path | None = None):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise corrupt_error(Path(path), run_root, KeyError(f"missing columns {missing}"))
    return df


# ---- writing artifacts ------------------------------------------------------------------------------
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json_atomic(path: str | Path, obj) -> None:
    """Write strict JSON via a temp file and rename, so a killed process never leaves half a file.
    NaN and infinities are refused: they are not JSON, and a result holding one is a bug upstream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        text = json.dumps(obj, indent=1, default=str, allow_nan=False)
    except ValueError as e:
        raise FlextronError(f"refusing to write {path}: a value is NaN or infinite ({e})") from None
    tmp.write_text(text)
    tmp.replace(path)


def write_parquet_atomic(df, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def content_id(*paths: str | Path) -> str:
    """A short id of what these files hold (names and bytes; a missing file counts as missing), so an
    artifact can record exactly which inputs it was built from and a stage can tell when they changed."""
    import hashlib

    h = hashlib.sha256()
    for p in map(Path, paths):
        h.update(p.name.encode() + b"\0")
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(b"\0missing\0")
    return h.hexdigest()[:16]


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(text)
    tmp.replace(path)


def fresh_tmp_dir(folder: str | Path) -> Path:
    """An empty sibling folder to build a new version of `folder` in (see `swap_in`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: str | Path, folder: str | Path) -> None:
    """Replace `folder` by the fully written `tmp`, crash-safely.

    The swap is two renames (folder -> folder.old, tmp -> folder). `tmp` is marked complete before
    either, so a kill between them leaves a state `recover_swap` resolves on the next start: the
    complete new version wins, else the old one is put back. No reader ever sees half a folder.
    """
    tmp, folder = Path(tmp), Path(folder)
    old = folder.with_name(folder.name + ".old")
    (tmp / COMPLETE_MARKER).write_text("")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def rebuild(folder: str | Path, only: tuple[str, ...] = ()):
    """Build a new version of `folder` aside and swap it in whole when the block ends (on an error or a
    kill, the old version stays). Concurrent builders of one folder take turns (a lock beside it), so
    none deletes another's half-built `.tmp`; inside the block the old version is still readable.
    `only`: the entries the block rebuilds, every other entry of the old version carried over (empty: the
    whole folder is rebuilt)."""
    folder = Path(folder)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        recover_swap(folder)
        tmp = fresh_tmp_dir(folder)
        if only and folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in only and entry.name != COMPLETE_MARKER:
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        yield tmp
        swap_in(tmp, folder)


def recover_swap(folder: str | Path) -> str | None:
    """Finish or undo a `swap_in` that a kill interrupted. Returns what was done (None: nothing)."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)  # killed after the swap, before the clean-up
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        return None
    if tmp.is_dir() and (tmp / COMPLETE_MARKER).is_file():
        tmp.rename(folder)
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
        return "completed"
    if old.is_dir():
        old.rename(folder)
        return "restored"
    return None


# ---- stage configs ----------------------------------------------------------------------------------
def save_stage_config(path: str | Path, cfg) -> None:
    write_json_atomic(path, dataclasses.asdict(cfg))


def check_resume(
    path: str | Path, cfg, fields: tuple[str, ...], restart_flag: str = "--restart", what: str = "this stage"
) -> dict | None:
    """Compare `cfg` with the config a resumable stage saved when it started (`path`), field by
    field; refuse the first mismatch in `fields` with the flag, both values and the way out.
    Returns the saved config (None when there is none)."""
    path = Path(path)
    if not path.is_file():
        return None
    prev = read_json(path)
    now = dataclasses.asdict(cfg)
    for name in fields:
        old, new = prev.get(name), now.get(name)
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(new, list):
            new = tuple(new)
        if name in prev and old != new:
            flag = "--" + name.replace("_", "-")
            raise FlextronError(
                f"{what} was started with {flag} {_show(old)}, now {_show(new)}; resuming would mix the two. "
                f"Pass {flag} {_show(old)} to resume, or {restart_flag} to start again (its results are removed)"
            )
    return prev


def _show(v) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v)) if v else "(none)"
    return str(v)


# ---- small shared checks ----------------------------------------------------------------------------
def check_finite(
    name: str,
    value: float,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
    whole: bool = False,
) -> None:
    """A FlextronError naming flag `name` unless `value` is a finite number (a whole one with
    `whole`) within the bounds."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FlextronError(f"{flag} must be a finite number, got {value!r}")
    if whole and int(value) != value:
        raise FlextronError(f"{flag} must be a whole number, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise FlextronError(f"{flag} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise FlextronError(f"{flag} must be <= {high}, got {value}")

"""The run directory: one folder per run, one sub-folder per stage, each stage's config beside it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from flextron.errors import FlextronError

# stage folder -> the command that creates it (named in errors when a later stage runs too early)
STAGES = {
    "elastic": "flextron convert --model MODEL --out {run}",
    "profile": "flextron profile --run {run} --regime REGIME",
    "latency_model": "flextron fit --run {run}",
    "search": "flextron search --run {run} --regime REGIME --budget-ms X",
    "router": "flextron route --run {run} --regime REGIME",
    "trained": "flextron train --run {run}",
}
WEIGHTS = ("auto", "elastic", "trained")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    @property
    def elastic(self) -> Path:
        return self.root / "elastic"

    def weights(self, choice: str = "auto") -> tuple[str, Path]:
        """Which elastic weights a stage uses: `elastic` (one-shot, as converted), `trained` (after
        `flextron train`), or `auto` (trained when it exists). Returns (name, folder)."""
        if choice not in WEIGHTS:
            raise FlextronError(f"--weights must be one of {list(WEIGHTS)}, got {choice!r}")
        if choice == "auto":
            choice = "trained" if (self.root / "trained" / "config.json").is_file() else "elastic"
        return choice, self.require(choice)

    def require(self, stage: str, marker: str | None = None) -> Path:
        """The stage folder, or a FlextronError naming the command that makes it."""
        path = self.root / stage
        check = path / marker if marker else path
        if not check.exists():
            cmd = STAGES.get(stage, f"the {stage} stage").format(run=self.root)
            raise FlextronError(f"{check} does not exist yet; run `{cmd}` first")
        return path


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON via a temp file and rename, so a killed process never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def save_stage_config(path: str | Path, cfg) -> None:
    write_json_atomic(path, dataclasses.asdict(cfg))

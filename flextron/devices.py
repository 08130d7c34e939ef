"""One check for `--device`, used by every stage that runs a model (one message, one place)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys

from flextron.errors import FlextronError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_name(device: str) -> str:
    """The syntax only (cheap, no torch): `cpu`, `cuda` or `cuda:N`."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise FlextronError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


@functools.lru_cache(maxsize=None)
def _auto_device() -> str:
    import torch

    if torch.cuda.is_available():
        print(f"flextron: --device auto: CUDA is present, using cuda ({torch.cuda.get_device_name(0)})",
              file=sys.stderr)
        return "cuda"
    print("flextron: --device auto: no CUDA device, using cpu", file=sys.stderr)
    return "cpu"


def resolve_device(device: str, cpu_only: bool = False) -> str:
    """`device` checked, with `auto` made concrete: CUDA when torch sees it (said once on stderr), else
    the CPU; `cpu_only` (the llama.cpp engine) makes auto the CPU. For config `__post_init__`, so the
    saved config records the device that was used."""
    if device == "auto":
        return "cpu" if cpu_only else _auto_device()
    return check_device_name(device)


def set_device_field(cfg, cpu_only: bool = False) -> None:
    """Resolve a frozen config's `device` field in place (see `resolve_device`)."""
    object.__setattr__(cfg, "device", resolve_device(cfg.device, cpu_only))


def check_device(device: str) -> str:
    """`device` if this machine has it, else a FlextronError saying what it has instead."""
    check_device_name(device)
    if device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        raise FlextronError(f"--device {device} was asked for but torch sees no CUDA device here; use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    n = torch.cuda.device_count()
    if index >= n:
        raise FlextronError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return device


PIN_AUTO = -2  # --pin-core's default: see `pinned`


@contextlib.contextmanager
def pinned(core: int, device: str = "cpu", threads: int | None = 1):
    """Pin this process to CPU `core` for the block (Linux), then restore its affinity; -1: no pinning;
    PIN_AUTO (-2): the last core it may use when it measures on the CPU with one thread and can pin
    (Linux), else no pinning. Yields the core pinned to (None when not pinned). A core this process may
    not use is refused. On the 2-core development box, pinned rounds measured a ratio noise floor of
    3.6% / 4.2% against 6.3% / 9.1% unpinned, quiet / beside a bursty interferer (median of 3 passes,
    benchmarks/pinning.py): hence the default."""
    if isinstance(core, bool) or not isinstance(core, int) or core < PIN_AUTO:
        raise FlextronError(f"--pin-core must be -2 (auto), -1 (not pinned) or a core number, got {core!r}")
    if core == PIN_AUTO:
        one_thread = threads is not None and threads <= 1
        core = max(os.sched_getaffinity(0)) if device == "cpu" and one_thread and hasattr(
            os, "sched_setaffinity") else -1
    if core == -1:
        yield None
        return
    if not hasattr(os, "sched_setaffinity"):
        raise FlextronError("--pin-core needs Linux (os.sched_setaffinity); leave it at -1 here")
    before = os.sched_getaffinity(0)
    if core not in before:
        raise FlextronError(f"--pin-core {core}: this process may use cores {sorted(before)}; pick one of them")
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


def set_cpu_threads(device: str, threads: int = 0) -> int | None:
    """Pin torch's intra-op threads for a CPU measurement and return the count (None on CUDA).

    0 means one thread. On a small CPU, intra-op threads oversubscribe as soon as anything else runs:
    a 2-vCPU SmolLM2 decode step took 578-752 ms at torch's default 2 threads with one other process
    busy, and 71-100 ms at 1 thread. One thread is also how llama.cpp-style CPU serving is measured.
    Record the count beside the measurements (device.json); pass more on a machine kept quiet.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise FlextronError(f"--threads must be 0 (one thread) or a positive count, got {threads!r}")
    if device != "cpu":
        return None
    import torch

    n = threads or 1
    torch.set_num_threads(n)
    return n


EVAL_DTYPES = ("auto", "float32", "bfloat16")


def cpuinfo(field: str, path: str = "/proc/cpuinfo") -> str | None:
    """The first CPU's `field` in Linux `/proc/cpuinfo` (e.g. `model name`, `flags`); None where there is no
    such file or field."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags; empty where `/proc/cpuinfo` is missing (not Linux)."""
    return set((cpuinfo("flags", path) or "").split())


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 natively: a CUDA device of compute capability 8 or later (Ampere
    on; older ones emulate it), or a CPU with AVX512-BF16 or AMX (elsewhere the CPU emulates it, slower
    than float32)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.get_device_properties(torch.device(device)).major >= 8
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def check_eval_dtype(dtype: str) -> str:
    if dtype not in EVAL_DTYPES:
        raise FlextronError(f"--eval-dtype must be one of {list(EVAL_DTYPES)}, got {dtype!r}")
    return dtype


def resolve_eval_dtype(dtype: str, device: str, kept_config=None) -> str:
    """The dtype quality is evaluated in (losses, the quality table): `float32` or `bfloat16` as asked; for
    `auto`, the one the stage's earlier results in this run were made in (`kept_config`: their saved
    config, whose losses a resume must compare with; float32 when it names none, made before the choice),
    else bfloat16 where `device` computes it natively, else float32 (what it costs and buys, measured:
    benchmarks/eval_dtype.py, docs/method.md "Evaluation precision")."""
    import json
    from pathlib import Path

    if check_eval_dtype(dtype) != "auto":
        return dtype
    if kept_config is not None and Path(kept_config).is_file():
        try:
            return check_eval_dtype(json.loads(Path(kept_config).read_text()).get("eval_dtype", "float32"))
        except (OSError, ValueError, AttributeError, FlextronError):
            pass  # unreadable or damaged: the stage's own checks say so; choose afresh
    return "bfloat16" if native_bf16(device) else "float32"

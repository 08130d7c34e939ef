"""One check for `--device`, used by every stage that runs a model (one message, one place)."""

from __future__ import annotations

import re

from flextron.errors import FlextronError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_name(device: str) -> str:
    """The syntax only (cheap, no torch): `cpu`, `cuda` or `cuda:N`. For config `__post_init__`."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise FlextronError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return device


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

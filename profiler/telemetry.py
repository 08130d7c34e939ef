"""Device facts and per-cell telemetry: NVML on NVIDIA GPUs, processor facts on CPU."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from flextron.devices import cpuinfo

# NVML throttle reasons that mean the clocks were pulled down by power or heat while measuring.
# (GpuIdle and the application-clock setting are not throttling of a running kernel.)
# Bits: 0x4 SW power cap, 0x8 HW slowdown, 0x20 SW thermal, 0x40 HW thermal, 0x80 HW power brake.
_THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


def _git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


class Telemetry:
    """`device_info()` once per run, `sample()` beside every cell, `energy_mj()` for energy spans."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self._handle = None
        if self.device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:  # NVML missing (e.g. some containers): timing still works
                self._handle = None

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return _cpu_model()

    def device_info(self) -> dict:
        info = {
            "device": str(self.device),
            "device_name": self.device_name,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_hash": _git_hash(),
            "hostname": platform.node(),
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                        memory_gib=round(props.total_memory / 2**30, 2), capability=f"{props.major}.{props.minor}")
            if self._handle is not None:
                n = self._nvml
                info.update(
                    driver=n.nvmlSystemGetDriverVersion(),
                    power_limit_w=n.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1e3,
                    max_sm_clock_mhz=n.nvmlDeviceGetMaxClockInfo(self._handle, n.NVML_CLOCK_SM),
                    max_mem_clock_mhz=n.nvmlDeviceGetMaxClockInfo(self._handle, n.NVML_CLOCK_MEM),
                )
        else:
            info.update(cores=os.cpu_count(), torch_threads=torch.get_num_threads(), machine=platform.machine())
        return info

    def sample(self) -> dict:
        """Clocks, power, temperature and throttle state now (None on CPU or without NVML)."""
        keys = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "throttle_reasons", "energy_mj")
        if self._handle is None:
            return {**dict.fromkeys(keys), "throttled": False}
        n, h = self._nvml, self._handle
        reasons = n.nvmlDeviceGetCurrentClocksEventReasons(h) if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons") \
            else n.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        return {
            "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "mem_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1e3,
            "temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
            "throttle_reasons": int(reasons),
            "energy_mj": self.energy_mj(),
            "throttled": bool(reasons & _THROTTLE_MASK),
        }

    def energy_mj(self) -> float | None:
        """Total energy since driver load (mJ); None where the counter is unavailable."""
        if self._handle is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

"""Data parallelism under `torchrun`: which process this is, the process group, and the collectives
training needs.

`torchrun --nproc-per-node N -m flextron -- train ...` starts N processes and tells each its place in
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A process started any
other way is a world of one: it makes no process group, and every collective here returns at once,
so one process runs the same code as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from flextron.errors import FlextronError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise FlextronError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0  #: index of this process, 0 to size - 1; rank 0 writes the files and shows progress
    size: int = 1  #: processes in all
    local_rank: int = 0  #: index among the processes on this machine; picks its GPU

    @classmethod
    def from_env(cls) -> World:
        """The world `torchrun` describes in the environment; a world of one without it."""
        world = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
            raise FlextronError(f"RANK={world.rank}, WORLD_SIZE={world.size}, LOCAL_RANK={world.local_rank} "
                                "do not describe a process group; start several processes with torchrun")
        return world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this process computes on: `cuda` means cuda:LOCAL_RANK, one GPU per process."""
        if self.size == 1 or device == "cpu":
            return device
        if device != "cuda":
            raise FlextronError(f"--device {device} names one GPU, but torchrun started {self.size} processes, one "
                                "per GPU; use --device cuda (each process takes cuda:LOCAL_RANK)")
        import torch

        count = torch.cuda.device_count()
        if 0 < count <= self.local_rank:  # with none at all, `check_device` says so
            raise FlextronError(f"torchrun started more processes on this machine than its {count} CUDA device(s); "
                                f"use --nproc-per-node {count} or fewer")
        return f"cuda:{self.local_rank}"

    def shard(self, batch):
        """(this process's contiguous share of the rows of `batch`, its weight).

        The weight (share's rows / batch's rows x size) makes the mean over processes of weight x the
        share's mean loss the whole batch's mean loss; even shares weigh 1. A process left with no
        rows (a short last batch of a corpus that wrapped around) runs one row at weight 0, so that it
        still joins the gradient all-reduce.
        """
        if self.size == 1:
            return batch, 1.0
        import torch

        part = torch.tensor_split(batch, self.size)[self.rank]
        if len(part) == 0:
            return batch[:1], 0.0
        return part, len(part) * self.size / len(batch)

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.local_rank] if dist.get_backend() == "nccl" else None)

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """The mean over processes of each of `values` (float64), the same on every process."""
        if self.size == 1:
            return values
        import torch
        import torch.distributed as dist

        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.size).tolist()


@contextlib.contextmanager
def process_group(world: World, device: str):
    """The default process group of `world` while the block runs (gloo on the CPU, NCCL on CUDA),
    destroyed when it ends, on error too. Nothing for a world of one, or where the caller made one."""
    import torch.distributed as dist

    if world.size == 1 or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()

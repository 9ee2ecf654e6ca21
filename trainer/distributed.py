"""Device and process-group setup in one place (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which share of the work it has."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    """This process group was joined by `setup` (not by the caller): `cleanup` leaves it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str) -> Runtime:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank if world > 1 else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:  # a caller's own group (train() from a script that set one up) is used as is
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(device=dev, rank=rank, world=world, owns_group=owns_group)


def cleanup(rt: Runtime) -> None:
    """Leave the process group if `setup` joined it; one the caller set up stays theirs."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel training across processes, as launched by ``torchrun``.

    torchrun --nproc-per-node 8 -m quadmamba train --model quadmamba_t --data /imagenet --device cuda

Each process trains a replica of the model (torch's DistributedDataParallel averages the
gradients) on its share of every global batch; ``--batch-size`` is the global batch, so a run
takes the same optimizer steps whatever the number of processes. The processes find each other
through the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
without them, or with WORLD_SIZE=1, training runs in this process alone and torch.distributed
is not touched. Backends: gloo for the CPU, NCCL for CUDA (process r on device cuda:LOCAL_RANK).

Exactness: global batch i of an epoch is the same images whatever the number of processes
(``epoch_batches``), and each process scales its summed loss by world / (global batch size),
so the averaged gradient is the gradient of the global batch's mean loss even when the batch
does not split evenly. What differs from one process is the random draws (Gumbel noise, drop
path, augmentation): each process draws its own.
"""
from __future__ import annotations

import atexit
import gc
import os
import warnings
from dataclasses import dataclass
from typing import List, Sequence

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (rank 0 of 1: alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and prints its log."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over the processes (the tensor itself when alone).
        ``values`` must be on the device the backend serves (CPU for gloo, CUDA for NCCL)."""
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"distributed launch: environment variable {name} must be an integer, got {text!r} "
                         "(launch with torchrun, which sets it)") from None


def launched_group() -> Group:
    """The group torchrun's environment describes, without joining it (rank 0 of 1 without)."""
    if "WORLD_SIZE" not in os.environ:
        return Group()
    world = _env_int("WORLD_SIZE")
    if world == 1:
        return Group()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not (world > 1 and 0 <= rank < world and local_rank >= 0):
        raise ValueError(f"distributed launch: RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local_rank} "
                         "are inconsistent")
    return Group(rank, world, local_rank)


def join(group: Group, device: torch.device) -> None:
    """Join the process group of ``group`` (once per process; a no-op alone or when joined).

    The CPU uses gloo and CUDA NCCL; torch.distributed must be available in this build."""
    if group.world == 1:
        return
    if not torch.distributed.is_available():
        raise ValueError("distributed training: this build of torch has no torch.distributed")
    if torch.distributed.is_initialized():
        return
    backend = BACKENDS[device.type]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method="env://", rank=group.rank,
                                         world_size=group.world,
                                         device_id=device if device.type == "cuda" else None)
    atexit.register(leave)
    # A depthwise convolution's weight gradient (C, 1, k, k) comes back with another stride on
    # its size-1 axis than the parameter has; DDP copies it into its bucket all the same.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def leave() -> None:
    """Leave the process group (joined by ``join``; at exit at the latest).

    The group's worker threads are joined when its last reference goes: a
    DistributedDataParallel that still holds it (a reference cycle, or a caller's local) would
    keep them running into the interpreter's shutdown, where a thread that releases a finished
    collective's tensors cannot take the GIL and the process aborts ("terminate called without
    an active exception"). So unreachable holders are collected first; callers drop their own
    DistributedDataParallel before calling this."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def process_device(name: str, group: Group) -> str:
    """The device name this process trains on: alone, ``name`` itself; in a group, "cpu" stays
    "cpu" and "cuda" (or "auto" where CUDA is available) becomes cuda:LOCAL_RANK. An explicit
    cuda:N is refused in a group (every process would take the same device)."""
    if group.world == 1:
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda:"):
        raise ValueError(f"--device {name}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    if name == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if group.local_rank >= count:
            raise ValueError(f"--device cuda: process with LOCAL_RANK {group.local_rank} has no GPU "
                             f"({count} CUDA device(s) here); start at most {count} processes per node")
        return f"cuda:{group.local_rank}"
    return name


def global_steps(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch: n images in global batches of batch_size, a last partial
    batch kept when every process gets at least one of its images."""
    check_global_batch(batch_size, world)
    return n // batch_size + (1 if n % batch_size >= world else 0)


def check_global_batch(batch_size: int, world: int) -> None:
    """Every one of the ``world`` processes needs a part of every global batch."""
    if world < 1:
        raise ValueError(f"the number of processes must be >= 1, got {world}")
    if batch_size < world:
        raise ValueError(f"--batch-size {batch_size} is the global batch; it must be at least the number of "
                         f"processes ({world})")


def epoch_batches(order: Sequence[int], batch_size: int, group: Group = Group()) -> List[List[int]]:
    """This process's part of every global batch of an epoch.

    ``order`` is the epoch's data order (the same in every process); global batch i is
    order[i*B : (i+1)*B] and process r takes the r-th of ``world`` consecutive parts whose
    sizes differ by at most one (the first B mod world parts one larger). A last batch with
    fewer images than processes is left out (global_steps counts the batches kept)."""
    order = list(order)
    batches = []
    for i in range(global_steps(len(order), batch_size, group.world)):
        chunk = order[i * batch_size:(i + 1) * batch_size]
        base, extra = divmod(len(chunk), group.world)
        start = group.rank * base + min(group.rank, extra)
        batches.append(chunk[start:start + base + (1 if group.rank < extra else 0)])
    return batches


def shard(dataset, group: Group):
    """The part of ``dataset`` this process evaluates: items rank, rank + world, ... (each item
    once in the whole group, no padding, so sums over the group count every item exactly
    once); the dataset itself when alone."""
    if group.world == 1:
        return dataset
    return torch.utils.data.Subset(dataset, range(group.rank, len(dataset), group.world))

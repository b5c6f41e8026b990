"""Process-group helpers for ``torchrun --nproc_per_node N`` (DistributedDataParallel).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) every helper is a
cheap no-op for a single process, so training code calls them unconditionally. The group uses NCCL
when the job trains on GPUs and gloo on CPUs; each process drives the GPU ``LOCAL_RANK``.

On one machine::

    torchrun --standalone --nproc_per_node 4 --no-python lrx run configs/exp04.yaml

Multi-node runs use torchrun's rendezvous, e.g. the same command on each of two machines::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
        --rdzv_id lrx1 --no-python lrx run configs/exp04.yaml

Each process trains on its shard of every epoch with its own batch of ``data.batch_size`` images
(the global batch is N times larger); metrics are reduced over all processes; rank 0 alone writes.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lrx.base.errors import UserError

__all__ = ["env_world_size", "setup", "is_initialized", "rank", "world_size", "is_main", "is_distributed",
           "local_device", "wrap", "unwrap", "shard", "own_count", "all_reduce_sum", "any_true", "gather",
           "file_exists", "barrier", "cleanup", "resolve_device"]


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str | torch.device = "cpu") -> None:
    """Join the process group torchrun describes, once; nothing to do in a single process.

    Call it before anything touches CUDA so that ``"cuda"`` means this process's own GPU.
    """
    if env_world_size() <= 1 or is_initialized():
        return
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, or torchrun's ``RANK`` before the group is joined (else 0)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and logs (rank 0)."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def local_device(device: str | torch.device) -> torch.device:
    """``device`` with an explicit index: ``cuda`` becomes this process's current GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else ``model`` itself.

    Only parameters with ``requires_grad`` are synchronised, so freeze before wrapping.
    """
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # buffers (BN statistics) follow rank 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def shard(batches):
    """This process's share of ``batches`` (``Batches.shard``), or ``batches`` in a single process."""
    return batches.shard(rank(), world_size()) if is_distributed() else batches


def own_count(total: int) -> int:
    """How many of ``total`` strided samples are this rank's own, not the padding a shard repeats."""
    return len(range(rank(), total, world_size()))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over the processes (in place; returned for convenience)."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any process (every process gets the same answer)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def file_exists(path) -> bool:
    """Whether ``path`` exists, the same answer on every process: a checkpoint seen by some
    processes only (nodes without a shared run directory) is a clear error, not a hang."""
    seen = gather(os.path.exists(path))
    if len(set(seen)) > 1:
        raise UserError(f"{path} exists on ranks {[r for r, s in enumerate(seen) if s]} only; "
                        "the processes of a multi-node run need a shared run directory")
    return seen[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (end of a torchrun job)."""
    if is_initialized():
        dist.destroy_process_group()


def resolve_device(want: str | torch.device | None) -> torch.device:
    """The device to run on: ``"auto"`` / None picks CUDA when available, else the CPU; CUDA without a GPU is refused.

    The one place lrx turns a configured device into a ``torch.device`` (runs, profiling).
    """
    if want is None or str(want) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(want)
    except RuntimeError:
        raise UserError(f"unknown device {str(want)!r}; allowed: auto, cpu, cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(want)!r} asked for, but no CUDA GPU is available; allowed here: auto, cpu")
    return device

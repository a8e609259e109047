"""Data-parallel training across the processes ``torchrun --nproc-per-node N`` starts.

Every process runs the same recipe on the same (deterministic) model and data order; inside the one
training loop each global batch is split along dimension 0 into one shard per process, each process
back-propagates its shard's loss weighted by its share of the batch, and the gradients are summed with
one all-reduce per step (gloo on CPU, NCCL on CUDA): the synchronous data parallelism of PyTorch's
``DistributedDataParallel`` (Li et al., VLDB 2020), done on gradients rather than through a wrapper
module so that loss functions may keep calling the model's own methods and submodules.

The result equals one process's up to float rounding for models without batch-dependent layers in
training mode: BatchNorm normalises each shard by its own statistics (as under DDP without
SyncBatchNorm) and dropout draws other masks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True for rank 0 (or a single process): the one that writes files and prints results."""
    return world()[0] == 0


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1).

    Backend: NCCL for CUDA devices, gloo otherwise. Returns whether this process is one of several.
    Nothing happens for a plain single-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = torch.distributed
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension shared by the batch's tensors (tuples, lists, dicts), or None."""
    sizes = {t.shape[0] for t in _tensors(batch) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def shard(batch: Any, rank: int, world_size: int) -> tuple[Any, float]:
    """This process's slice of ``batch`` and the weight of its loss (its share of the batch x world size).

    A batch that cannot be split evenly into non-empty shards (fewer samples than processes, or tensors
    of different leading sizes) is processed whole by every process with weight 1: the averaged gradient
    is then the full batch's gradient as well.
    """
    n = batch_size_of(batch)
    if world_size <= 1 or n is None or n < world_size:
        return batch, 1.0
    bounds = [n * i // world_size for i in range(world_size + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    return _slice(batch, lo, hi, n), (hi - lo) * world_size / n


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean over processes) the gradients of ``params`` in one flat buffer."""
    _, size = world()
    if size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (every process gets the same number)."""
    _, size = world()
    if size <= 1:
        return value
    total = value.detach().clone().float().reshape(1)
    torch.distributed.all_reduce(total)
    return total[0] / size


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _slice(batch: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return type(batch)((k, _slice(v, lo, hi, n)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, lo, hi, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, lo, hi, n) for v in batch)
    return batch

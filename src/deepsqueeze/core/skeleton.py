"""Build a model's module tree without allocating its weights."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def empty_weights() -> Iterator[None]:
    """Inside this block, every parameter a module registers is moved to the ``meta`` device at once.

    Buffers stay real (they are small, and some, like rotary frequencies, are computed in ``__init__``
    and never stored in a checkpoint). Each parameter exists in memory only while its own constructor
    runs, so building a model of any size costs about its largest layer. Load real tensors afterwards
    with ``module.load_state_dict(tensors, strict=False, assign=True)``.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Any) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def release_(module: nn.Module) -> None:
    """Move ``module``'s parameters and buffers to the ``meta`` device and give the memory back to the OS.

    glibc keeps freed heap memory for reuse; a loop that loads, transforms and frees one large block after
    another would otherwise see its resident size climb with every block, so the heap is trimmed here.
    """
    module.to(torch.device("meta"))
    gc.collect()
    _trim_heap()


def bounded_heap() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping (glibc), returned to the OS when freed.

    glibc raises its mmap threshold as large blocks are freed and then serves them from a heap that only
    grows; a process that handles one large block after another (streaming quantization) keeps its peak
    flat only with a fixed threshold. A no-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _trim_heap() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

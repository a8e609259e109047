"""Building a model's skeleton without allocating its weights (lean loading).

Inside :func:`skeleton`, every parameter and every persistent buffer a module registers is moved to
the ``meta`` device as it is registered (the idea of Hugging Face accelerate's
``init_empty_weights``): constructors still run, but their weights occupy no memory, and their
initialisers (``reset_parameters``, Hugging Face ``_init_weights``) touch nothing. Non-persistent
buffers (position ids and the like, which no checkpoint stores) stay real. The loader then assigns
each decoded tensor straight into place (``load_state_dict(..., assign=True)``), so the fp32 base
model is never materialized before its compressed replacement. :func:`meta_tensors` names what is
still unmaterialized afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["meta_tensors", "skeleton"]

_META = torch.device("meta")


@contextmanager
def skeleton() -> Iterator[None]:
    """Modules built inside hold their parameters and persistent buffers on the meta device."""
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def meta_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to(_META), requires_grad=param.requires_grad)

    def meta_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        if tensor is not None and persistent and not tensor.is_meta:
            tensor = tensor.to(_META)
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter = meta_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = meta_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device (not materialized)."""
    named: Any = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False))
    return [name for name, tensor in named if tensor is not None and tensor.is_meta]

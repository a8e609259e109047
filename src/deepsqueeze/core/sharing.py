"""Shared tensors: tied weights (``lm_head.weight is wte.weight``) and the buffers of their representations.

A state dict lists a shared tensor under every name that reaches it. The artifact stores it once,
under the first name, and records ``{alias: source}``; the loader re-ties the alias to the very
tensor of the source (:func:`tie_tensor`), so the loaded model shares memory as the original did.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from deepsqueeze.errors import ArtifactError

__all__ = ["shared_tensors", "tie_tensor", "tied_weight_groups"]


def _identity(t: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def shared_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: source}`` for state-dict entries that are the same tensor (same storage, offset, shape,
    strides and dtype) as an earlier entry; ``source`` is the first name in ``state``'s order."""
    first: dict[tuple, str] = {}
    ties: dict[str, str] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = _identity(tensor)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties


def tie_tensor(root: nn.Module, alias: str, source: str) -> None:
    """Make state-dict entry ``alias`` of ``root`` the same tensor object as ``source`` (ArtifactError if
    either name does not exist)."""
    src_owner, src_attr = _owner(root, source)
    dst_owner, dst_attr = _owner(root, alias)
    tensor = src_owner._parameters.get(src_attr)
    if tensor is None:
        tensor = src_owner._buffers.get(src_attr)
    if tensor is None:
        raise ArtifactError(f"cannot tie {alias} to {source}: {source} is not a tensor of the model")
    if dst_attr in dst_owner._parameters:
        if not isinstance(tensor, nn.Parameter):
            raise ArtifactError(f"cannot tie parameter {alias} to buffer {source}")
        dst_owner._parameters[dst_attr] = tensor
    elif dst_attr in dst_owner._buffers:
        dst_owner._buffers[dst_attr] = tensor
    else:
        raise ArtifactError(f"cannot tie {alias} to {source}: {alias} is not a tensor of the model")


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (root.get_submodule(path) if path else root), attr
    except AttributeError:
        raise ArtifactError(f"the model has no module {path!r} (for tensor {name})") from None


def tied_weight_groups(root: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of ``(module name, parameter name)`` that hold one shared parameter, for every parameter
    reached from more than one place (tied embeddings, modules reused at two paths)."""
    by_id: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in root.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                by_id.setdefault(id(param), []).append((mod_name, attr))
    return [places for places in by_id.values() if len(places) > 1]

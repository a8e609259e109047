"""Per-layer surgery: a registry from layer type to how its output and input channels are cut.

``cut_out(module, keep)`` keeps output channels/features ``keep`` (a sorted LongTensor);
``cut_in(module, keep)`` keeps input channels/features ``keep``. Both edit the module in place
(new, smaller Parameters and buffers; shape attributes updated) so names and hooks stay valid.
New layer types plug in with ``register_surgery``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from deepsqueeze.core.record import KeptIndices, TransformParams, record_transform, register_transform
from deepsqueeze.core.walker import get_submodule
from deepsqueeze.errors import ArtifactError, UnsupportedLayerError

Cut = Callable[[nn.Module, torch.Tensor], None]


@dataclass(frozen=True)
class Surgery:
    cut_out: Cut
    cut_in: Cut


_SURGERY: dict[type[nn.Module], Surgery] = {}


def register_surgery(layer_type: type[nn.Module], cut_out: Cut, cut_in: Cut) -> None:
    """Teach structured pruning how to cut ``layer_type`` (subclasses match too)."""
    _SURGERY[layer_type] = Surgery(cut_out, cut_in)


# Rules for classes of optional libraries, keyed by "module.QualName" so the library is never imported here.
_SURGERY_BY_NAME: dict[str, Surgery] = {}


def surgery_for(module: nn.Module, name: str = "") -> Surgery:
    for cls in type(module).__mro__:
        if cls in _SURGERY:
            return _SURGERY[cls]
        by_name = _SURGERY_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if by_name is not None:
            return by_name
    raise UnsupportedLayerError(f"layer {name or '?'} ({type(module).__name__}) has no surgery rule: "
                                "exclude it or register one with deepsqueeze.prune.register_surgery")


def _param(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    setattr(module, attr, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))


def _buffer(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    setattr(module, attr, value.detach().clone().contiguous())


def _linear_out(m: nn.Module, keep: torch.Tensor) -> None:
    _param(m, "weight", m.weight[keep])
    if m.bias is not None:
        _param(m, "bias", m.bias[keep])
    m.out_features = len(keep)


def _linear_in(m: nn.Module, keep: torch.Tensor) -> None:
    _param(m, "weight", m.weight[:, keep])
    m.in_features = len(keep)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_out(m: nn.Module, keep: torch.Tensor) -> None:
    depthwise = _is_depthwise(m)
    if m.groups > 1 and not depthwise:
        raise UnsupportedLayerError(f"grouped convolution (groups={m.groups}) output channels cannot be cut")
    _param(m, "weight", m.weight[keep])
    if m.bias is not None:
        _param(m, "bias", m.bias[keep])
    m.out_channels = len(keep)
    if depthwise:  # a depthwise conv's channels are its groups: cutting one cuts input and output
        m.in_channels = m.groups = len(keep)


def _conv_in(m: nn.Module, keep: torch.Tensor) -> None:
    if _is_depthwise(m):
        _conv_out(m, keep)
        return
    if m.groups > 1:
        raise UnsupportedLayerError(f"grouped convolution (groups={m.groups}) input channels cannot be cut")
    _param(m, "weight", m.weight[:, keep])
    m.in_channels = len(keep)


def _norm_cut(m: nn.Module, keep: torch.Tensor) -> None:
    if m.affine:
        _param(m, "weight", m.weight[keep])
        _param(m, "bias", m.bias[keep])
    if m.running_mean is not None:
        _buffer(m, "running_mean", m.running_mean[keep])
        _buffer(m, "running_var", m.running_var[keep])
    m.num_features = len(keep)


register_surgery(nn.Linear, _linear_out, _linear_in)
register_surgery(nn.Conv2d, _conv_out, _conv_in)
register_surgery(nn.Conv1d, _conv_out, _conv_in)
register_surgery(nn.modules.batchnorm._BatchNorm, _norm_cut, _norm_cut)


def _conv1d_out(m: nn.Module, keep: torch.Tensor) -> None:
    """transformers' Conv1D (GPT-2) stores the weight transposed: (in, out)."""
    _param(m, "weight", m.weight[:, keep])
    if m.bias is not None:
        _param(m, "bias", m.bias[keep])
    m.nf = len(keep)


def _conv1d_in(m: nn.Module, keep: torch.Tensor) -> None:
    _param(m, "weight", m.weight[keep])
    if hasattr(m, "nx"):
        m.nx = len(keep)


_SURGERY_BY_NAME["transformers.pytorch_utils.Conv1D"] = Surgery(_conv1d_out, _conv1d_in)


def cut_(root: nn.Module, name: str, dim: str, keep: torch.Tensor | list[int], record: bool = True) -> None:
    """Cut layer ``name`` of ``root`` along ``dim`` ("out" or "in") to indices ``keep``; record it for replay."""
    module = get_submodule(root, name)
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    surgery = surgery_for(module, name)
    if dim == "out":
        surgery.cut_out(module, keep_t)
    elif dim == "in":
        surgery.cut_in(module, keep_t)
    else:
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    if record:
        record_transform(root, "prune_channels", name, dim=dim, keep=[int(i) for i in keep_t])


class CutParams(TransformParams):
    dim: Literal["out", "in"]
    keep: KeptIndices


@register_transform("prune_channels", params=CutParams)
def _replay_cut(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    module = get_submodule(root, target)
    size = _channel_count(module, params["dim"])
    if size is not None and params["keep"][-1] >= size:
        raise ArtifactError(f"keeps channel {params['keep'][-1]} of {target!r}, which has {size}")
    try:
        cut_(root, target, params["dim"], params["keep"], record=False)
    except (AttributeError, IndexError, KeyError) as exc:
        raise ArtifactError(f"cannot replay channel pruning of {target!r}: {exc}") from None


def _channel_count(module: nn.Module, dim: str) -> int | None:
    """Output (``dim="out"``) or input channels of ``module`` where its kind says (None: unknown kind)."""
    for out_attr, in_attr in (("out_features", "in_features"), ("out_channels", "in_channels"),
                              ("num_features", "num_features"), ("embedding_dim", "embedding_dim")):
        if hasattr(module, out_attr):
            return int(getattr(module, out_attr if dim == "out" else in_attr))
    return None

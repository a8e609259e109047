"""What the loader replays for quantized layers (the ``quant.*`` transforms :func:`~deepsqueeze.quant.api.quantize_`
records) and the check it runs on a loaded model's quantization parameters. Each transform's params model
bounds what a forged manifest can ask for before anything is allocated.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import pydantic
import torch
from torch import nn

from deepsqueeze.core.record import register_model_check, register_transform
from deepsqueeze.core.walker import get_submodule, set_submodule
from deepsqueeze.errors import ArtifactError
from deepsqueeze.quant.api import MODULE_CLASSES, representations
from deepsqueeze.runtime import PackedWeights

# Geometry a quantized module must share with the float module it replaces (checked at replay, so a
# forged manifest can neither allocate beyond the base model nor build a layer whose forward fails).
_GEOMETRY = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
             "dilation", "groups", "num_embeddings", "embedding_dim", "padding_idx")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class QuantModuleParams(pydantic.BaseModel):
    """``quant.module`` params: the representation's class and its constructor arguments (checked
    against the replaced module's geometry by the replay)."""

    model_config = pydantic.ConfigDict(extra="allow")
    cls: Annotated[str, pydantic.Strict(), pydantic.Field(max_length=64)]
    bits: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=8)] | None = None
    group_size: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 31)] | None = None
    bias: Annotated[bool, pydantic.Strict()] | None = None
    float_zero: Annotated[bool, pydantic.Strict()] | None = None

    @pydantic.field_validator("cls")
    @classmethod
    def _registered(cls, value: str) -> str:  # the registry, not a list frozen at import: plug-ins add to it
        if value not in MODULE_CLASSES:
            raise ValueError(f"unknown quantized module class (known: {', '.join(sorted(MODULE_CLASSES))})")
        return value


@register_transform("quant.module", params=QuantModuleParams)
def _replay_module(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    params = dict(params)
    cls = MODULE_CLASSES.get(params.pop("cls", None))  # type: ignore[arg-type]
    if cls is None:
        raise ArtifactError(f"unknown quantized module class for {target}: upgrade deepsqueeze")
    old = get_submodule(root, target)
    takes = set(inspect.signature(cls).parameters)
    for key in _GEOMETRY:
        if not hasattr(old, key) or key not in takes:
            continue
        if key not in params:  # a constructor default would silently stand in for the replaced geometry
            raise ArtifactError(f"quant.module params for {target!r} lack {key}: the file is corrupted or forged")
        if not _same(params[key], _plain(getattr(old, key))):
            raise ArtifactError(f"{cls.__name__} with {key}={str(params[key])[:40]} cannot replace "
                                f"{type(old).__name__} {target!r} ({key}={_plain(getattr(old, key, None))})")
    if not any(key in params for key in _GEOMETRY):
        raise ArtifactError(f"quant.module params for {target!r} name no geometry")
    set_submodule(root, target, cls(**params))


def _same(value: Any, expected: Any) -> bool:
    """Equal as JSON data of the same types: ``True`` is not ``1``, a list must match element by element."""
    if isinstance(expected, (list, tuple)):
        return isinstance(value, list) and len(value) == len(expected) and all(
            _same(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    return value == expected


class _PackedSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    shape: Annotated[list[Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 40)]],
                     pydantic.Field(min_length=1, max_length=8)]
    bits: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=8)]
    group_size: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 31)] | None = None


class PackedWeightsParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    specs: Annotated[dict[Annotated[str, pydantic.Field(max_length=1024)], _PackedSpec], pydantic.Field(min_length=1)]


@register_transform("quant.packed_weights", params=PackedWeightsParams)
def _replay_packed_weights(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    specs = params.get("specs")
    if not isinstance(specs, dict):
        raise ArtifactError(f"malformed quant.packed_weights transform for {target}")
    inner = get_submodule(root, target)
    for name, spec in specs.items():
        path, _, attr = name.rpartition(".")
        weight = getattr(inner.get_submodule(path) if path else inner, attr, None)
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != spec["shape"]:
            raise ArtifactError(f"packed weight {name!r} of {target!r} does not match the module's tensor")
    set_submodule(root, target, PackedWeights(inner, specs))


@register_transform("quant.identity")
def _replay_identity(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    set_submodule(root, target, nn.Identity())


@register_model_check
def _quantization_parameters_in_range(root: nn.Module) -> str | None:
    """Stored scales finite and non-negative (activation scales positive), zero points within uint8:
    what a forged artifact could otherwise hand to the quantized kernels, whose forward would fail."""
    for name, module in root.named_modules():
        if not isinstance(module, representations()):
            continue
        for bname, buf in module.named_buffers():
            if buf is None or not buf.numel():
                continue
            where = f"{name}.{bname}" if name else bname
            if bname.endswith("scale") and buf.is_floating_point():
                if not bool(torch.isfinite(buf).all()) or bool((buf < 0).any()):
                    return f"{where} holds negative or non-finite scales"
                if bname.rsplit(".", 1)[-1] in ("input_scale", "output_scale") and bool((buf <= 0).any()):
                    return f"{where} holds a zero activation scale"
            if bname.endswith("zero_point") and (bool((buf < 0).any()) or bool((buf > 255).any())
                                                 or (buf.is_floating_point() and not bool(torch.isfinite(buf).all()))):
                return f"{where} holds zero points outside 0..255"
    return None

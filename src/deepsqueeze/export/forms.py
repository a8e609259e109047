"""What the graph exporters (ONNX, ExecuTorch) share: the module tree with each representation replaced by its
export form, and the torch outputs an exported file must reproduce."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Model
from deepsqueeze.errors import ModelError, UnsupportedLayerError
from deepsqueeze.runtime import forced_int8_kernel

__all__ = ["replaced_by_forms", "traced_reference"]

FormFn = Callable[[nn.Module], "tuple[nn.Module, str] | None"]


def replaced_by_forms(module: nn.Module, form_of: FormFn, runtime: str) -> tuple[nn.Module, list[dict[str, str]]]:
    """A copy of ``module`` whose representations are replaced by ``form_of(layer)``'s modules, and the list of
    ``{"module", "kind", "exported_as"}`` for each replaced one (the original is not changed).

    ``form_of`` answers ``(module, description)``, None (traced as it is) or raises
    :class:`UnsupportedLayerError`, which becomes a :class:`ModelError` naming the layer and ``runtime``.
    """
    forms: dict[str, tuple[nn.Module, str, str]] = {}
    for name, layer in module.named_modules():  # parents before children: a replaced parent takes its subtree
        if not name or any(name.startswith(p + ".") for p in forms):
            continue
        try:
            found = form_of(layer)
        except UnsupportedLayerError as exc:
            raise ModelError(f"layer {name} ({type(layer).__name__}) cannot be exported to {runtime}: {exc}") from None
        if found is not None:
            forms[name] = (found[0], type(layer).__name__, found[1])
    memo = {id(layer): None for name, layer in module.named_modules() if name in forms}  # not deep-copied
    shadow = copy.deepcopy(module, memo)
    for name, (form, _, _) in forms.items():
        parent, _, child = name.rpartition(".")
        setattr(shadow.get_submodule(parent) if parent else shadow, child, form)
    report = [{"module": n, "kind": k, "exported_as": d} for n, (_, k, d) in forms.items()]
    return shadow.eval(), report


def traced_reference(model: Model, sample: Any) -> Any:
    """The output an exported file must reproduce: the model's reference arithmetic (per-token int8 layers on
    8-bit codes through ``_int_mm``, as the graphs' integer operators compute them), not the 7-bit activations
    of fbgemm's kernel that the int8 race picks on CPUs without VNNI."""
    module = model.module
    module.eval()
    with torch.no_grad(), forced_int8_kernel("int_mm"):
        if isinstance(sample, dict):
            return module(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"])
        return module(sample)

"""Students: a copy of the teacher with layers dropped (a real, smaller architecture), or a smaller zoo model.

``keep_layers_`` replaces a stack of layers (``nn.ModuleList`` / ``nn.Sequential``, e.g. a BERT
encoder's ``transformer.encoder.layer``) by the kept ones, initialised from the teacher's weights,
and records the transform ``distill.keep_layers`` so the loader rebuilds the shorter stack.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from deepsqueeze.core.record import KeptIndices, TransformParams, record_transform, register_transform
from deepsqueeze.core.walker import get_submodule, set_submodule
from deepsqueeze.errors import RecipeError, UnsupportedLayerError

#: Where layer stacks live in the models deepsqueeze knows (first match wins).
LAYER_STACKS = ("transformer.encoder.layer", "encoder.layer", "layers", "layer")


def find_layer_stack(root: nn.Module) -> str:
    """The dotted name of the model's stack of repeated layers (a BERT encoder's ``encoder.layer``, GPT-2's
    ``h``, Llama's ``layers``): a known path first, else the ``nn.ModuleList`` of two or more modules of one
    class holding the most parameters. Raises ``UnsupportedLayerError`` when there is none."""
    for name in LAYER_STACKS:
        try:
            stack = get_submodule(root, name)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList | nn.Sequential):
            return name
    stacks = [(sum(p.numel() for p in m.parameters()), name) for name, m in root.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    if stacks:
        return max(stacks, key=lambda item: item[0])[1]
    raise UnsupportedLayerError(
        f"no stack of layers found (looked for {', '.join(LAYER_STACKS)} and any list of repeated blocks): pass "
        "layers_path to name it")


def alternate_layers(n_layers: int, n_keep: int) -> list[int]:
    """``n_keep`` evenly spread layer indices that always include the last layer (6 -> 3: [1, 3, 5])."""
    if not 1 <= n_keep <= n_layers:
        raise RecipeError(f"cannot keep {n_keep} of {n_layers} layers: choose between 1 and {n_layers}")
    step = n_layers / n_keep
    return sorted({int(round((i + 1) * step)) - 1 for i in range(n_keep)})


def keep_layers_(root: nn.Module, keep: list[int], layers_path: str | None = None) -> str:
    """Keep only layers ``keep`` (teacher indices, in order) of the model's layer stack; return its path."""
    path = layers_path or find_layer_stack(root)
    _apply_keep(root, path, list(keep))
    record_transform(root, "distill.keep_layers", path, keep=[int(i) for i in keep])
    return path


def _apply_keep(root: nn.Module, path: str, keep: list[int]) -> None:
    stack = get_submodule(root, path)
    if not isinstance(stack, nn.ModuleList | nn.Sequential):
        raise UnsupportedLayerError(f"{path} is a {type(stack).__name__}, not a ModuleList or Sequential of layers")
    n = len(stack)
    if not keep or any(not 0 <= i < n for i in keep) or sorted(set(keep)) != list(keep):
        raise RecipeError(f"keep must be increasing distinct layer indices in [0, {n}), got {keep}")
    kept = [stack[i] for i in keep]
    set_submodule(root, path, type(stack)(kept))
    for i, layer in enumerate(kept):  # HF layers carry their index (used by caches / attention masks)
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    config = _hf_config(root)
    if config is not None and getattr(config, "num_hidden_layers", None) == n:
        config.num_hidden_layers = len(keep)


def _hf_config(root: nn.Module) -> Any:
    for module in root.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            return config
    return None


class KeepLayersParams(TransformParams):
    keep: KeptIndices


@register_transform("distill.keep_layers", params=KeepLayersParams)
def _replay_keep_layers(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    _apply_keep(root, target, [int(i) for i in params["keep"]])

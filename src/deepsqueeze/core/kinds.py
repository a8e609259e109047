"""Layer kinds: which modules hold weights, and which of their tensors are "the weights".

One registry from module type to :class:`LayerKind`, so a new layer kind is one entry. A kind may be
registered by class or by qualified class name (``"transformers.pytorch_utils.Conv1D"``), so optional
libraries are never imported to register them. Lookup walks the class's MRO, so subclasses inherit.

Coverage (what each stage did per module) and ``plan`` read these kinds; techniques declare the kind
names they handle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from deepsqueeze.core.record import record_transform, register_transform

__all__ = [
    "LayerKind",
    "as_linear_",
    "conv1d_to_linear",
    "layer_kind",
    "register_kind",
    "weight_bearing_modules",
    "weight_elements",
]


@dataclass(frozen=True)
class LayerKind:
    """``name`` (stable, used in recipes and coverage tables), the parameter names that count as its
    weights (biases and norm scales excluded; dotted names reach into children), and whether it owns
    its children (``nn.MultiheadAttention`` runs ``out_proj`` itself, so ``out_proj`` is not a
    separate Linear to replace)."""

    name: str
    weights: Callable[[nn.Module], list[str]]
    owns_children: bool = False


_KINDS: dict[type | str, LayerKind] = {}


def register_kind(key: type | str, kind: LayerKind) -> None:
    """Register ``kind`` for module class ``key`` (or its qualified name ``"pkg.module.Class"``)."""
    _KINDS[key] = kind


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module`` (nearest class in its MRO), or None."""
    for cls in type(module).__mro__:
        kind = _KINDS.get(cls) or _KINDS.get(_qualname(cls))
        if kind is not None:
            return kind
    return None


def _weight(module: nn.Module) -> list[str]:
    return ["weight"] if getattr(module, "weight", None) is not None else []


def _rnn_weights(module: nn.Module) -> list[str]:
    return [n for n in module._flat_weights_names if n.startswith("weight_")]  # type: ignore[union-attr]


def _mha_weights(module: nn.Module) -> list[str]:
    names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
             if getattr(module, n, None) is not None]
    return [*names, "out_proj.weight"]


for _cls, _name in ((nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"),
                    (nn.ConvTranspose1d, "conv-transpose1d"), (nn.ConvTranspose2d, "conv-transpose2d"),
                    (nn.Embedding, "embedding"), (nn.EmbeddingBag, "embedding-bag")):
    register_kind(_cls, LayerKind(_name, _weight))
register_kind("transformers.pytorch_utils.Conv1D", LayerKind("hf-conv1d", _weight))
register_kind(nn.LSTM, LayerKind("lstm", _rnn_weights))
register_kind(nn.GRU, LayerKind("gru", _rnn_weights))
register_kind(nn.RNN, LayerKind("rnn", _rnn_weights))
register_kind(nn.MultiheadAttention, LayerKind("multihead-attention", _mha_weights, owns_children=True))


def _tensor(module: nn.Module, dotted: str):  # noqa: ANN202 - Tensor | None
    path, _, attr = dotted.rpartition(".")
    owner = module.get_submodule(path) if path else module
    return getattr(owner, attr, None)


def weight_elements(module: nn.Module, seen: set[int] | None = None) -> int:
    """Weight elements of ``module`` by its kind (0 for an unregistered module); tensors whose id is in
    ``seen`` are skipped and ids are added to it, so a tied weight counts once across calls."""
    kind = layer_kind(module)
    if kind is None:
        return 0
    total = 0
    for name in kind.weights(module):
        t = _tensor(module, name)
        if t is None:
            continue
        if seen is not None:
            if id(t) in seen:
                continue
            seen.add(id(t))
        total += t.numel()
    return total


def weight_bearing_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module, LayerKind | None]]:
    """``(name, module, kind)`` for every module that holds weights: registered kinds (not descending
    into a kind that owns its children), and unregistered modules with a parameter of 2 or more
    dimensions of their own (``kind`` None: no technique knows them)."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module, LayerKind | None]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            kind = layer_kind(child)
            if kind is not None:
                yield name, child, kind
                if kind.owns_children:
                    continue
            elif any(p.dim() >= 2 for p in child.parameters(recurse=False)):
                yield name, child, None
            yield from walk(name, child)

    yield from walk("", root)


def as_linear_(root: nn.Module, name: str) -> nn.Linear:
    """Replace transformers' ``Conv1D`` at ``name`` of ``root`` by the equal ``nn.Linear``, recorded (transform
    ``as_linear``) so that a loader rebuilds the same module tree before it loads the weights."""
    from deepsqueeze.core.walker import set_submodule

    layer = conv1d_to_linear(root.get_submodule(name))
    set_submodule(root, name, layer)
    record_transform(root, "as_linear", name)
    return layer


@register_transform("as_linear")
@register_transform("quant.as_linear")  # the name artifacts written before the transform moved to core carry
def _replay_as_linear(root: nn.Module, target: str, params: dict) -> None:
    from deepsqueeze.core.walker import get_submodule, set_submodule

    set_submodule(root, target, conv1d_to_linear(get_submodule(root, target)))


def conv1d_to_linear(conv1d: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (``y = x W + b`` with W of shape (in, out)) as the equal ``nn.Linear``."""
    weight = conv1d.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv1d.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight.t())
    if conv1d.bias is not None:
        linear.bias.data.copy_(conv1d.bias.detach())
    return linear

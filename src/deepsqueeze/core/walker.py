"""Find and replace submodules by name pattern, type and predicate."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

ModuleFilter = Callable[[str, nn.Module], bool]


def iter_modules(
    model: nn.Module,
    types: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: ModuleFilter | None = None,
    skip_empty: bool = True,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for submodules matching every given criterion.

    ``include``/``exclude`` are fnmatch patterns on the dotted module name (``"encoder.*.query"``).
    Modules whose weight has no elements (``nn.Linear(32, 0)``) are left out unless ``skip_empty`` is
    False: there is nothing in them to compress (``has_empty_weight``).
    The list is materialised first, so callers may replace modules while iterating.
    """
    selected = []
    for name, module in model.named_modules():
        if not name:
            continue
        if skip_empty and has_empty_weight(module):
            continue
        if types is not None and not isinstance(module, types):
            continue
        if include and not _matches(name, include):
            continue
        if exclude and _matches(name, exclude):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        selected.append((name, module))
    yield from selected


def has_empty_weight(module: nn.Module) -> bool:
    """True when ``module.weight`` is a tensor with no elements (a zero-size Linear, Conv or Embedding).

    Every technique skips such layers: no values to quantize, prune, share or factor, and no bytes to save.
    """
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.numel() == 0


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether dotted module ``name`` matches any fnmatch pattern of ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


_matches = name_matches


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module`` (encodings recorded for the old one's tensors
    that ``module`` does not have are dropped)."""
    from deepsqueeze.core.record import forget_replaced_encodings

    parent_name, _, child = name.rpartition(".")
    parent = get_submodule(root, parent_name)
    setattr(parent, child, module)
    forget_replaced_encodings(root, name, module)

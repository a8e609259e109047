"""Old import paths kept for one release: a module-level ``__getattr__`` that warns, then forwards.

A module whose contents moved keeps its name and ends with::

    __getattr__ = moved_to(__name__, {runtime: ["Int8Linear", ...]})

so ``from deepsqueeze.quant.modules import Int8Linear`` still works and says where the class lives now.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from deepsqueeze.errors import DeepsqueezeDeprecationWarning

__all__ = ["moved_to"]


def moved_to(old: str, moved: Mapping[ModuleType, Iterable[str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for module ``old`` whose names now live in other modules (``{module: names}``)."""
    homes = {name: module for module, names in moved.items() for name in names}

    def __getattr__(name: str) -> Any:
        new = homes.get(name)
        if new is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {new.__name__}.{name}: import it from {new.__name__} "
                      "(the old path goes away in the next release)", DeepsqueezeDeprecationWarning, stacklevel=2)
        return getattr(new, name)

    return __getattr__

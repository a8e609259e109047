"""Imports the built-in technique modules so their stages, transforms and encodings register.

Core never imports a technique statically; it names them here and imports them on demand.
"""

from __future__ import annotations

import importlib

BUILTIN_PLUGINS: tuple[str, ...] = (
    "deepsqueeze.codec.encodings",
    "deepsqueeze.train.stage",
    "deepsqueeze.quant",
    "deepsqueeze.prune",
    "deepsqueeze.share",
    "deepsqueeze.lowrank",
    "deepsqueeze.distill",
)

_loaded = False


def load_plugins() -> None:
    """Import every built-in plugin module once (those not yet written are skipped)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise

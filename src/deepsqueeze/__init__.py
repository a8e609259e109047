"""deepsqueeze: make trained PyTorch models smaller and faster, and prove it.

The Python API in one screen::

    import deepsqueeze as ds
    model = ds.resolve_model("zoo:lenet5@fashion-mnist")
    ds.run_stages(model, ds.load_recipe("deep-compression"), ds.resolve_data("fashion-mnist"))
    ds.save(model, "lenet5.dsq")
    print(ds.evaluate(ds.load("lenet5.dsq"), ds.resolve_data("fashion-mnist")))

Technique verbs live in their families (``deepsqueeze.quant.quantize_``, ``deepsqueeze.prune.prune_``, ...);
the names below are the toolkit's shared surface. Attributes load lazily so ``import deepsqueeze`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deepsqueeze._version import __version__

_EXPORTS: dict[str, str] = {
    "Model": "deepsqueeze.core.model",
    "Task": "deepsqueeze.core.model",
    "StageContext": "deepsqueeze.core.context",
    "StageConfig": "deepsqueeze.core.config",
    "register_stage": "deepsqueeze.core.config",
    "registered_stages": "deepsqueeze.core.config",
    "save": "deepsqueeze.artifact",
    "load": "deepsqueeze.artifact",
    "resolve_model": "deepsqueeze.resolve",
    "resolve_data": "deepsqueeze.data",
    "evaluate": "deepsqueeze.eval",
    "export": "deepsqueeze.export",
    "ExportResult": "deepsqueeze.export",
    "Recipe": "deepsqueeze.recipes",
    "load_recipe": "deepsqueeze.recipes",
    "parse_recipe": "deepsqueeze.recipes",
    "run_stages": "deepsqueeze.recipes",
    "compress": "deepsqueeze.recipes",
    "CompressResult": "deepsqueeze.recipes",
    "fit": "deepsqueeze.train",
    "DeepsqueezeError": "deepsqueeze.errors",
    "ArtifactError": "deepsqueeze.errors",
    "RecipeError": "deepsqueeze.errors",
    "DataError": "deepsqueeze.errors",
    "ModelError": "deepsqueeze.errors",
    "UnsupportedLayerError": "deepsqueeze.errors",
    "DeepsqueezeWarning": "deepsqueeze.errors",
}

__all__ = [
    "ArtifactError",
    "CompressResult",
    "DataError",
    "DeepsqueezeError",
    "DeepsqueezeWarning",
    "ExportResult",
    "Model",
    "ModelError",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "StageContext",
    "Task",
    "UnsupportedLayerError",
    "compress",
    "evaluate",
    "export",
    "fit",
    "load",
    "load_recipe",
    "parse_recipe",
    "register_stage",
    "registered_stages",
    "resolve_data",
    "resolve_model",
    "run_stages",
    "save",
    "__version__",
]

if TYPE_CHECKING:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.config import StageConfig, register_stage, registered_stages
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.core.model import Model, Task
    from deepsqueeze.data import resolve_data
    from deepsqueeze.errors import (
        ArtifactError,
        DataError,
        DeepsqueezeError,
        DeepsqueezeWarning,
        ModelError,
        RecipeError,
        UnsupportedLayerError,
    )
    from deepsqueeze.eval import evaluate
    from deepsqueeze.export import ExportResult, export
    from deepsqueeze.recipes import CompressResult, Recipe, compress, load_recipe, parse_recipe, run_stages
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.train import fit


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepsqueeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

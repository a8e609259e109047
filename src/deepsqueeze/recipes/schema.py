"""The recipe file: ``{model?, data?, seed?, description?, stages: [{type: ..., ...}, ...]}``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from deepsqueeze.core.config import StageConfig, config_from_dict, config_to_dict
from deepsqueeze.errors import RecipeError

RECIPE_KEYS = ("model", "data", "seed", "description", "on_unsupported", "stages")


class Recipe(BaseModel):
    """A validated recipe: stage configs in order plus optional default model and data."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    stages: tuple[StageConfig, ...]
    model: str | None = None
    data: str | None = None
    seed: int = 0
    description: str | None = None
    on_unsupported: Literal["warn", "skip", "error"] = "warn"  # weight-bearing layers a stage does not handle

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("model", "data", "description") if getattr(self, k)}
        out["seed"] = self.seed
        if self.on_unsupported != "warn":
            out["on_unsupported"] = self.on_unsupported
        out["stages"] = [config_to_dict(stage) for stage in self.stages]
        return out


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as plain data; errors name the stage, the key and the allowed keys."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'stages' list, got {type(data).__name__}")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key {unknown[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list of stages, each with a 'type'")
    configs = tuple(config_from_dict(stage, where=f"{source}: stage {i + 1}") for i, stage in enumerate(stages))
    try:
        return Recipe(stages=configs, **{k: v for k, v in data.items() if k != "stages"})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RecipeError(f"{source}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def shipped_recipes_dir() -> Path:
    """The shipped YAML recipes: the source checkout's recipes/, else a wheel's <prefix>/share/deepsqueeze/recipes."""
    checkout = Path(__file__).resolve().parents[3] / "recipes"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "deepsqueeze" / "recipes"


def find_recipe(name: str) -> Path | None:
    """A shipped recipe by name (``int8-dynamic``) or None."""
    path = shipped_recipes_dir() / f"{name}.yaml"
    return path if path.is_file() else None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (a bare name like ``int8-dynamic`` finds a shipped recipe)."""
    file = Path(path)
    if not file.exists() and file.suffix == "" and find_recipe(str(path)) is not None:
        file = find_recipe(str(path))  # type: ignore[assignment]
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {file} does not exist: see the recipes/ folder for shipped ones") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {file}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {file} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, source=str(file))

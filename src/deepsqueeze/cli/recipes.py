"""``deepsqueeze recipes``: the shipped recipes (one line each) and every stage type with its keys."""

from __future__ import annotations

from typing import Any

import typer

from deepsqueeze.cli._common import JsonOption, emit_json


def stage_keys() -> dict[str, dict[str, Any]]:
    """Stage type -> {key: default} from the registered config classes (``"required"`` where there is none)."""
    from pydantic_core import PydanticUndefined

    from deepsqueeze.core.config import registered_stages

    out: dict[str, dict[str, Any]] = {}
    for stage_type, config_cls in registered_stages().items():
        keys: dict[str, Any] = {}
        for key, field in config_cls.model_fields.items():
            default = field.default
            if default is PydanticUndefined:
                default = "required" if field.default_factory is None else field.default_factory()
            keys[key] = getattr(default, "value", default)
        out[stage_type] = keys
    return out


def listing_text() -> str:
    """The human listing: recipes with their descriptions, then stage types with key=default pairs."""
    from deepsqueeze.recipes.schema import shipped_recipes, shipped_spaces

    recipes, spaces = shipped_recipes(), shipped_spaces()
    width = max(map(len, [*recipes, *spaces]), default=0)
    lines = ["Shipped recipes (--recipe NAME works from any directory):"]
    lines += [f"  {name:<{width}}  {description}" for name, description in recipes.items()]
    lines += ["", "Shipped search spaces (deepsqueeze search --space NAME, from any directory):"]
    lines += [f"  {name:<{width}}  {description}" for name, description in spaces.items()]
    lines += ["", "Stage types (recipe form: {type: NAME, KEY: VALUE, ...}; key=default):"]
    for stage_type, keys in stage_keys().items():
        lines.append(f"  {stage_type}: " + ", ".join(f"{k}={_plain(v)}" for k, v in keys.items()))
    return "\n".join(lines)


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return "null" if value is None else str(value)


def register(app: typer.Typer) -> None:
    @app.command()
    def recipes(as_json: bool = JsonOption) -> None:
        """List the shipped recipes (one line each) and the stage types with their keys and defaults."""
        from deepsqueeze.recipes.schema import shipped_recipes, shipped_spaces

        if as_json:
            emit_json({"recipes": shipped_recipes(), "spaces": shipped_spaces(), "stages": stage_keys()})
        else:
            print(listing_text())

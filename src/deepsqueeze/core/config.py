"""Typed stage configs and the registry from stage type to (config class, handler).

A config is a frozen pydantic model that rejects unknown keys; its recipe form is
``{"type": <stage_type>, **fields}``. Technique folders register their stages with
``@register_stage(MyConfig)`` on the handler that applies the config to a model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from deepsqueeze.errors import RecipeError

StageHandler = Callable[..., None]

_STAGES: dict[str, tuple[type[StageConfig], StageHandler]] = {}


class StageConfig(BaseModel):
    """Base of every stage config: validated on construction, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    stage_type: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RecipeError(_explain(exc, type(self))) from None

    @classmethod
    def example(cls) -> StageConfig:
        """A valid instance (for docs and the round-trip test); override when a field is required."""
        return cls()


def register_stage(config_cls: type[StageConfig]) -> Callable[[StageHandler], StageHandler]:
    """Register ``handler(model, config, ctx)`` as the way to apply ``config_cls`` in a recipe."""
    if not config_cls.stage_type:
        raise TypeError(f"{config_cls.__name__} must set the class attribute stage_type")

    def decorate(handler: StageHandler) -> StageHandler:
        _STAGES[config_cls.stage_type] = (config_cls, handler)
        return handler

    return decorate


def registered_stages() -> dict[str, type[StageConfig]]:
    """Stage type -> config class, for every registered stage."""
    from deepsqueeze.core.plugins import load_plugins

    load_plugins()
    return {name: cls for name, (cls, _) in sorted(_STAGES.items())}


def stage_entry(stage_type: str) -> tuple[type[StageConfig], StageHandler]:
    """The config class and handler for ``stage_type``; RecipeError naming the known types otherwise."""
    stages = registered_stages()
    if stage_type not in _STAGES:
        hint = difflib.get_close_matches(stage_type, list(stages), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(
            f"unknown stage type {stage_type!r}{did_you_mean}; known stage types: {', '.join(stages)}"
        )
    return _STAGES[stage_type]


def config_from_dict(data: dict[str, Any], where: str = "stage") -> StageConfig:
    """Build a registered config from its recipe form ``{"type": ..., **fields}``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with a 'type' key, got {type(data).__name__}")
    fields = dict(data)
    stage_type = fields.pop("type", None)
    if stage_type is None:
        raise RecipeError(f"{where}: missing 'type' (one of: {', '.join(registered_stages())})")
    try:
        config_cls, _ = stage_entry(str(stage_type))
        return config_cls(**fields)
    except RecipeError as exc:
        raise RecipeError(f"{where} ({stage_type}): {exc}") from None


def config_to_dict(config: StageConfig) -> dict[str, Any]:
    """The recipe form of ``config``: plain JSON types only, enums as strings."""
    return {"type": config.stage_type, **config.model_dump(mode="json")}


def _explain(exc: ValidationError, config_cls: type[BaseModel]) -> str:
    allowed = ", ".join(config_cls.model_fields)
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            hint = difflib.get_close_matches(key, list(config_cls.model_fields), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"unknown key {key!r}{did_you_mean}; allowed keys: {allowed}")
        else:
            problems.append(f"{loc}: {err['msg']}")
    return "; ".join(problems)

"""Typed stage configs and the registry from stage type to (config class, handler).

A config is a frozen pydantic model that rejects unknown keys; its recipe form is
``{"type": <stage_type>, **fields}``. Technique folders register their stages with
``@register_stage(MyConfig)`` on the handler that applies the config to a model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from deepsqueeze.errors import RecipeError

StageHandler = Callable[..., Any]  # (model, config, ctx); recipes ignore what it returns

# ----------------------------------------------------------------------------------------------- field kinds
# Every numeric or boolean option of a stage config is one of these kinds, so its bounds are declared once.
# All are strict (``true`` is not 1, ``"3"`` is not 3; an int is accepted where a float is expected),
# floats are finite, and every number has an upper bound: ``epochs: 1e300`` is refused when the recipe is
# read, not discovered as a hang. Fields narrow a kind further with ``Field(...)`` (e.g. ``gt=0``).

MAX_EPOCHS = 10_000
MAX_THREADS = 256  # a bound, not a recommendation: a pool of 10**5 threads exhausts the machine
MAX_COUNT = 1 << 31  # samples, steps, rounds, ranks, layer indices ...

Epochs = Annotated[float, Strict(), Field(ge=0, le=MAX_EPOCHS, allow_inf_nan=False)]
"""Passes over the training data; fractions allowed."""
LearningRate = Annotated[float, Strict(), Field(gt=0, le=10.0, allow_inf_nan=False)]
"""Optimizer step size, in (0, 10]."""
Fraction = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
"""A ratio in [0, 1]: sparsity, kept energy, budget, a mixing weight such as SmoothQuant's alpha."""
Weight = Annotated[float, Strict(), Field(ge=0, le=1e6, allow_inf_nan=False)]
"""A non-negative loss weight, temperature, damping or weight decay, at most 1e6."""
Count = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT)]
"""A positive integer: batch size, samples, rounds, iterations, rank, group size."""
Index = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)]
"""A non-negative integer: a layer index, a number of heads removed, 0 meaning "none"/"automatic"."""
Bits = Annotated[int, Strict(), Field(ge=1, le=16)]
"""Bits per stored value (codes, codebook indices), 1..16."""
MeanBits = Annotated[float, Strict(), Field(ge=1, le=16, allow_inf_nan=False)]
"""An average number of bits per value, 1..16."""
Percent = Annotated[float, Strict(), Field(ge=0, le=100, allow_inf_nan=False)]
"""A percentage or percentile in [0, 100]."""
ByteSize = Annotated[int, Strict(), Field(ge=1, le=1 << 50)]
"""A size in bytes (at most 1 PiB)."""
Flag = Annotated[bool, Strict()]
"""A yes/no option: YAML ``true``/``false`` only, never 1/0 or a string."""
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
"""A random seed (NumPy takes 32 bits)."""

_STAGES: dict[str, tuple[type[StageConfig], StageHandler]] = {}


class StageConfig(BaseModel):
    """Base of every stage config: validated on construction, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    stage_type: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**{key: _python_scalars(value) for key, value in data.items()})
        except ValidationError as exc:
            raise RecipeError(_explain(exc, type(self))) from None

    def needs_data(self) -> bool:
        """Whether the stage trains or calibrates on data: without any, plan and compress refuse the recipe
        before any work. Default: a positive ``epochs``."""
        return float(getattr(self, "epochs", 0) or 0) > 0

    def preflight(self, model: Any) -> None:
        """Check, before any work, what the stage needs of ``model`` (a ``Model``) that its config decides:
        raise ``RecipeError`` / ``UnsupportedLayerError`` naming it. Plan and compress both call it."""

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
        hint = difflib.get_close_matches(stage_type[:100], list(stages), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(
            f"unknown stage type {_short(stage_type)!r}{did_you_mean}; known stage types: {', '.join(stages)}"
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
    if not isinstance(stage_type, str):
        raise RecipeError(f"{where}: 'type' must be a stage name (one of: {', '.join(registered_stages())}), "
                          f"got a {type(stage_type).__name__}")
    bad_keys = [k for k in fields if not isinstance(k, str)]
    if bad_keys:
        raise RecipeError(f"{where} ({_short(stage_type)}): option names are strings, got "
                          f"{type(bad_keys[0]).__name__} {_short(str(bad_keys[0]))!r}")
    try:
        config_cls, _ = stage_entry(stage_type)
        return config_cls(**fields)
    except RecipeError as exc:
        raise RecipeError(f"{where} ({_short(stage_type)}): {exc}") from None


def _python_scalars(value: Any) -> Any:
    """NumPy scalars (from Optuna, array code) as the Python numbers the strict field kinds take;
    ``numpy.bool_`` becomes ``bool``, so it is still refused where a number is expected."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    if isinstance(value, list | tuple):
        return type(value)(_python_scalars(v) for v in value)
    if isinstance(value, dict):
        return {k: _python_scalars(v) for k, v in value.items()}
    return value


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_to_dict(config: StageConfig) -> dict[str, Any]:
    """The recipe form of ``config``: plain JSON types only, enums as strings. A field the class lists in
    ``omitted_at_default`` (one added after artifacts were written) is left out while at its default, so a
    recipe that does not use it writes the bytes it wrote before."""
    data = config.model_dump(mode="json")
    for key in getattr(config, "omitted_at_default", ()):
        if getattr(config, key) == type(config).model_fields[key].default:
            data.pop(key, None)
    return {"type": config.stage_type, **data}


def _explain(exc: ValidationError, config_cls: type[BaseModel]) -> str:
    allowed = ", ".join(config_cls.model_fields)
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            hint = difflib.get_close_matches(key[:100], list(config_cls.model_fields), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"unknown key {_short(key)!r}{did_you_mean}; allowed keys: {allowed}")
        else:
            problems.append(f"{loc}: {err['msg']}")
    return "; ".join(problems)

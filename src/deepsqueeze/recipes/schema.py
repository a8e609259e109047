"""The recipe file: ``{model?, data?, seed?, description?, stages: [{type: ..., ...}, ...]}``."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from deepsqueeze.core.config import Seed, StageConfig, config_from_dict, config_to_dict
from deepsqueeze.errors import RecipeError, one_line

RECIPE_KEYS = ("model", "data", "seed", "description", "on_unsupported", "max_drop", "min_ratio", "min_steps",
               "stages")
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_VALUES = 100_000

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _RecipeLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """``yaml.safe_load``'s loader, plus YAML 1.2 floats: ``1e-4`` is a number, not the string "1e-4"."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_bounded(text: str, source: str = "recipe") -> Any:
    """``yaml.safe_load`` with bounds checked on the event stream, before any object is built.

    Refuses (``RecipeError``) more than ``MAX_RECIPE_BYTES`` of text, nesting deeper than
    ``MAX_RECIPE_DEPTH``, and more than ``MAX_RECIPE_VALUES`` values once aliases are expanded (a
    "billion laughs" document is a few hundred bytes of anchors that expand exponentially).
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source} is {len(text):,} characters: recipes are limited to {MAX_RECIPE_BYTES:,}")
    try:
        _check_events(yaml.parse(text, Loader=_RecipeLoader), source)
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{source} is not valid YAML{where}: {one_line(getattr(exc, 'problem', None) or exc, 200)}"
                          ) from None
    except RecursionError:  # a bound above should have caught it first; never a traceback
        raise RecipeError(f"{source} is nested too deeply: at most {MAX_RECIPE_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a scalar YAML's constructors refuse: an integer of
        # 5,000 digits (Python's int-conversion limit), a bad timestamp or base64 value
        raise RecipeError(f"{source} holds a value YAML cannot read: {one_line(exc, 160)}") from None


def _check_events(events: Iterator[yaml.Event], source: str) -> None:
    sizes: dict[str, int] = {}  # anchor -> number of values it expands to
    stack: list[list[Any]] = [[None, 0]]  # open collections: [anchor, values so far]
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n
        stack[-1][1] += n
        if total > MAX_RECIPE_VALUES:
            raise RecipeError(f"{source} expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases?): "
                              "write the recipe out plainly")

    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            add(1)
            stack.append([event.anchor, 0])
            if len(stack) - 1 > MAX_RECIPE_DEPTH:
                raise RecipeError(f"{source} is nested more than {MAX_RECIPE_DEPTH} levels deep: "
                                  "a recipe is a few levels of mappings and lists")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size = stack.pop()
            stack[-1][1] += size
            if anchor is not None:
                sizes[anchor] = size + 1
        elif isinstance(event, yaml.ScalarEvent):
            add(1)
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            add(sizes.get(event.anchor, 1))


class Recipe(BaseModel):
    """A validated recipe: stage configs in order plus optional default model and data."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    stages: tuple[StageConfig, ...]
    model: str | None = None
    data: str | None = None
    seed: Seed = 0
    description: str | None = None
    on_unsupported: Literal["warn", "skip", "error"] = "warn"  # weight-bearing layers a stage does not handle
    # the quality budget, in the task's unit (deepsqueeze.recipes.budget); None: the task's default
    max_drop: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] | None = None
    # over the quality budget, compress may lower the pruning stages' sparsity while the file stays this much
    # smaller than fp32 (None: it never trades size for quality)
    min_ratio: Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)] | None = None
    # every training stage runs at least this many optimizer steps: its epochs are raised on small data
    min_steps: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in ("model", "data", "description") if getattr(self, k)}
        out["seed"] = self.seed
        if self.on_unsupported != "warn":
            out["on_unsupported"] = self.on_unsupported
        for key in ("max_drop", "min_ratio", "min_steps"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
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
    """A shipped recipe by name (``int8-dynamic``, ``llm-mixed-3.5bpw``) or None; a name is never a path."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = shipped_recipes_dir() / f"{name}.yaml"
    return path if path.is_file() else None


def find_space(name: str) -> Path | None:
    """A shipped search space by name (``cnn-bits``, in ``recipes/spaces/``) or None."""
    path = shipped_recipes_dir() / "spaces" / f"{name}.yaml"
    return path if path.is_file() and "/" not in name else None


def shipped_spaces() -> dict[str, str]:
    """Shipped search space name -> its one-line ``description``."""
    return shipped_recipes(shipped_recipes_dir() / "spaces")


def shipped_recipes(folder: Path | None = None) -> dict[str, str]:
    """Shipped recipe name -> its one-line ``description`` (empty when the file has none or is unreadable);
    ``folder``: another folder of shipped YAML files (the search spaces)."""
    out: dict[str, str] = {}
    for file in sorted((folder or shipped_recipes_dir()).glob("*.yaml")):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        description = data.get("description") if isinstance(data, dict) else None
        out[file.stem] = " ".join(str(description).split()) if description else ""
    return out


def _missing_recipe(path: str | Path) -> RecipeError:
    """The error for a recipe that is neither a file nor a shipped name, with the nearest shipped name."""
    file = Path(path)
    names = list(shipped_recipes())
    if file.suffix in ("", ".yaml", ".yml") and file.stem in names:  # e.g. recipes/finetune.yaml from elsewhere
        return RecipeError(f"recipe file {file} does not exist here; {file.stem!r} is a shipped recipe: "
                           f"pass --recipe {file.stem} (works from any directory)")
    hint = difflib.get_close_matches(file.stem, names, n=1, cutoff=0.6)
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    return RecipeError(f"recipe {file} does not exist: {did_you_mean}pass a YAML file or a shipped recipe name "
                       f"({', '.join(names)}; see deepsqueeze recipes)")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (a bare name like ``int8-dynamic`` finds a shipped recipe).

    Raises RecipeError when the file is missing (naming the nearest shipped recipe), unreadable or invalid.
    """
    file = Path(path)
    if not file.exists() and file.suffix.lower() not in (".yaml", ".yml") and find_recipe(str(path)) is not None:
        file = find_recipe(str(path))  # type: ignore[assignment]
    try:
        with file.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)  # never more than the limit, whatever the file's size
    except FileNotFoundError:
        raise _missing_recipe(path) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {file}: {exc.strerror or one_line(exc)}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {file} is larger than {MAX_RECIPE_BYTES:,} bytes: a recipe is a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {file} is not UTF-8 text (byte {exc.start})") from None
    return parse_recipe(load_yaml_bounded(text, source=f"recipe {file}"), source=str(file))

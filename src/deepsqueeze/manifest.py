"""The one schema of a .dsq manifest: every field is bounded data, checked before anything is built.

``codec.format`` checks the container part (header, digest, tensor entries against the payload);
this module checks the rest with the same rules: base (``zoo.resolve``'s specs), transforms (kind and
target here, params by each transform's own model in ``core.record``), stages, coverage and ties.
Anything else is an ``ArtifactError`` that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic

from deepsqueeze.codec.format import MAX_NAME, TensorSpec, describe_error
from deepsqueeze.core.model import Task
from deepsqueeze.errors import ArtifactError
from deepsqueeze.zoo.resolve import (
    BASE_KINDS,
    MAX_CLASSES,
    MAX_DIM,
    BaseSpec,
    GGUFBase,
    HFBase,
    MiniLMBase,
    PyBase,
    ZooBase,
)

MAX_TRANSFORMS = 1_000_000
MAX_STAGES = 1_000
#: transforms and coverage entries per stored tensor, at most: a model's own size bounds its record
LIST_RATIO = 64
MAX_JSON_INT = 1 << 53

Name = Annotated[str, pydantic.Strict(), pydantic.Field(max_length=MAX_NAME)]
Text = Annotated[str, pydantic.Strict(), pydantic.Field(max_length=4096)]
Count = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=1 << 48)]
_Forbid = pydantic.ConfigDict(extra="forbid", frozen=True)


def _bounded_json(value: Any) -> Any:
    """Plain JSON data with integers within +-2**53 (stage configs, transform params)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool) or item is None or isinstance(item, (float, str)):
            continue
        if isinstance(item, int):
            if abs(item) > MAX_JSON_INT:
                raise ValueError(f"integer {str(item)[:20]}... exceeds 2**53")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            raise ValueError(f"{type(item).__name__} is not JSON data")
    return value


JsonDict = Annotated[dict[Name, Any], pydantic.AfterValidator(_bounded_json)]


class TransformSpec(pydantic.BaseModel):
    """A structural transform: which registered replay (``kind``), on which submodule, with what data."""

    model_config = _Forbid
    kind: Annotated[str, pydantic.Strict(), pydantic.Field(max_length=64)]
    target: Name
    params: JsonDict = {}


class CoverageSpec(pydantic.BaseModel):
    model_config = _Forbid
    stage: Count
    stage_type: Name
    module: Name
    kind: Name
    weights: Count
    action: Name
    into: Name | None = None
    reason: Text | None = None


class Manifest(pydantic.BaseModel):
    """Everything a .dsq manifest may hold (format 1 and 2)."""

    model_config = _Forbid
    format: Literal["deepsqueeze"]
    version: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 16)]
    creator: Text | None = None
    base: BaseSpec
    ref: Text | None = None
    task: Literal["classifier", "sentence-encoder", "sequence-classifier", "causal-lm"]
    base_params: Count
    input_shape: Annotated[list[Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_DIM)]],
                           pydantic.Field(min_length=1, max_length=8)] | None = None
    num_classes: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_CLASSES)] | None = None
    transforms: Annotated[list[TransformSpec], pydantic.Field(max_length=MAX_TRANSFORMS)] = []
    stages: Annotated[list[JsonDict], pydantic.Field(max_length=MAX_STAGES)] = []
    coverage: Annotated[list[CoverageSpec], pydantic.Field(max_length=MAX_TRANSFORMS)] = []
    ties: dict[Name, Name] = {}
    tensors: list[TensorSpec]

    @property
    def task_enum(self) -> Task:
        return Task(self.task)


def validate_manifest(manifest: dict[str, Any], version: int, where: str) -> Manifest:
    """Check ``manifest`` (already parsed with bounded depth) against the schema.

    Format-1 ``py`` bases named their factory; that name is dropped here (it is never imported).
    """
    if version == 1 and isinstance(manifest.get("base"), dict) and manifest["base"].get("kind") == "py":
        manifest = {**manifest, "base": {k: v for k, v in manifest["base"].items() if k != "factory"}}
    tensors = manifest.get("tensors")
    per_tensor_bound = LIST_RATIO * (len(tensors) + 1) if isinstance(tensors, list) else 0
    for key in ("transforms", "coverage"):
        value = manifest.get(key)
        if isinstance(value, list) and len(value) > per_tensor_bound:
            raise ArtifactError(f"{where} has a malformed manifest: field {key} holds {len(value):,} entries for "
                                f"{per_tensor_bound // LIST_RATIO - 1:,} tensors (at most {LIST_RATIO} per tensor)")
    base = manifest.get("base")
    if isinstance(base, dict) and base.get("kind") not in (None, *BASE_KINDS):
        raise ArtifactError(f"{where}: unknown base model kind {str(base.get('kind'))[:40]!r}: "
                            "this artifact needs a newer deepsqueeze")
    try:
        spec = Manifest.model_validate(manifest)
    except pydantic.ValidationError as exc:
        raise ArtifactError(f"{where} has a malformed manifest: {describe_error(exc, '')}") from None
    if spec.version != version:
        raise ArtifactError(f"{where} has a malformed manifest: field version is {spec.version}, "
                            f"the header says {version}")
    return spec


__all__ = ["BaseSpec", "GGUFBase", "HFBase", "Manifest", "MiniLMBase", "PyBase", "TransformSpec", "ZooBase", "validate_manifest"]

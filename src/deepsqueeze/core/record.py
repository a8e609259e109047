"""What the stages did to a model: structural transforms (replayed on load) and tensor encodings.

The record lives on the root module. A transform is ``(kind, target, params)``: ``kind`` names a
replay function registered by the technique that made it, which rebuilds the module structure
(shapes only) on a freshly built base model so the saved tensors fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import pydantic
from torch import nn

from deepsqueeze.errors import ArtifactError, DeepsqueezeWarning

ReplayFn = Callable[[nn.Module, str, dict[str, Any]], None]

def _increasing(values: list[int]) -> list[int]:
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("indices must be strictly increasing")
    return values


class TransformParams(pydantic.BaseModel):
    """Base of the params models transforms register: unknown keys are errors."""

    model_config = pydantic.ConfigDict(extra="forbid")


#: One index into a module's channels, heads or blocks (replays check the upper bound against the module).
Index = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=1 << 31)]
#: Kept indices of a pruning transform: non-empty, strictly increasing (no negatives, no repeats).
KeptIndices = Annotated[list[Index], pydantic.Field(min_length=1, max_length=1 << 24),
                        pydantic.AfterValidator(_increasing)]
#: A positive size (rank, head count) below 2**31.
Size = Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 31)]

_REPLAYS: dict[str, ReplayFn] = {}
_PARAMS: dict[str, type[Any]] = {}
_CHECKS: list[Callable[[nn.Module], str | None]] = []
_RECORD_ATTR = "_deepsqueeze_record"


@dataclass(frozen=True)
class Transform:
    kind: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Why a stage left a weight-bearing module alone (``CoverageEntry.reason``).
UNSUPPORTED = "unsupported type"
EXCLUDED = "excluded by pattern"
TOO_SMALL = "too small"
NOT_DIVISIBLE = "shape not divisible by the group size"
TIED = "tied to a module already handled"
NOT_REACHED = "not reached by the calibration data"
BLOCKED = "blocked by the dependency graph"
EMPTY = "zero-size weight"  # nothing to compress (core.walker.has_empty_weight)

COVERAGE_ACTIONS = ("compressed", "skipped", "float")


@dataclass(frozen=True)
class CoverageEntry:
    """What one stage did to one weight-bearing module.

    ``action`` is ``compressed`` (``into`` names the representation, e.g. ``Int8Linear`` or
    ``mask 50%``), ``skipped`` (``reason`` says why: one of the reason constants of this module, with
    detail after a colon) or ``float`` (the stage does not claim this kind, so it stays float).
    ``weights`` counts the module's weight elements (biases and norms excluded), shared ones once.
    """

    stage: int
    stage_type: str
    module: str
    kind: str
    weights: int
    action: str
    into: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoverageEntry:
        try:
            return cls(int(data["stage"]), str(data["stage_type"]), str(data["module"]), str(data["kind"]),
                       int(data["weights"]), str(data["action"]), data.get("into"), data.get("reason"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed coverage entry in the manifest ({type(exc).__name__}: {exc})") from None


@dataclass
class CompressionRecord:
    transforms: list[Transform] = field(default_factory=list)
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    coverage: list[CoverageEntry] = field(default_factory=list)


def get_record(model: nn.Module) -> CompressionRecord:
    """The record attached to ``model`` (created empty on first use)."""
    record = model.__dict__.get(_RECORD_ATTR)
    if record is None:
        record = CompressionRecord()
        model.__dict__[_RECORD_ATTR] = record
    return record


def register_transform(kind: str, params: type[Any] | None = None) -> Callable[[ReplayFn], ReplayFn]:
    """Register ``replay(root, target, params)`` for transforms of ``kind``.

    ``params`` is the pydantic model a manifest's params for this kind must satisfy (types, bounds)
    before the replay runs; the replay itself checks them against the module it replaces.
    """

    def decorate(fn: ReplayFn) -> ReplayFn:
        _REPLAYS[kind] = fn
        if params is not None:
            _PARAMS[kind] = params
        return fn

    return decorate


def register_model_check(check: Callable[[nn.Module], str | None]) -> Callable[[nn.Module], str | None]:
    """Register ``check(loaded_root) -> problem or None``, run on every model loaded from an artifact
    (after its tensors are in place): what a forged but well-typed manifest could make inconsistent,
    such as quantization parameters out of range or head counts that no longer fit the weights."""
    _CHECKS.append(check)
    return check


def check_loaded_model(model: nn.Module, where: str = "artifact") -> None:
    """Run every registered model check; ``ArtifactError`` on the first problem."""
    for check in _CHECKS:
        problem = check(model)
        if problem:
            raise ArtifactError(f"{where} holds an inconsistent model: {' '.join(problem.split())[:240]}")


def record_transform(model: nn.Module, kind: str, target: str, **params: Any) -> None:
    """Append a structural transform to ``model``'s record; ``params`` must be JSON-serializable."""
    if kind not in _REPLAYS:
        raise KeyError(f"transform kind {kind!r} has no registered replay function")
    get_record(model).transforms.append(Transform(kind, target, params))


def record_encoding(model: nn.Module, tensor_name: str, encoding: str, **params: Any) -> None:
    """Ask the artifact writer to store state-dict entry ``tensor_name`` with ``encoding``."""
    get_record(model).encodings[tensor_name] = {"encoding": encoding, **params}


def record_coverage(model: nn.Module, entries: list[CoverageEntry]) -> None:
    """Append a stage's coverage entries to ``model``'s record."""
    get_record(model).coverage.extend(entries)


def forget_replaced_encodings(root: nn.Module, name: str, new: nn.Module) -> None:
    """Drop the encodings recorded for tensors under ``name`` that the module now at ``name`` lacks.

    A later stage that replaces a layer (quantization, factorization) makes the encodings earlier stages
    recorded for the old layer's tensors (e.g. pruning's sparse weight) stale: they would name tensors the
    model no longer has.
    """
    record = root.__dict__.get(_RECORD_ATTR)
    if record is None or not record.encodings:
        return
    prefix = f"{name}." if name else ""
    kept = set(new.state_dict())
    stale = [k for k in record.encodings if k.startswith(prefix) and k[len(prefix):] not in kept]
    if stale:
        kinds = sorted({str(record.encodings[k].get("encoding")) for k in stale})
        warnings.warn(f"layers replaced by {type(new).__name__} lose the {', '.join(kinds)} storage an earlier "
                      "stage chose for their weights: the new representation is stored as it is (put the "
                      "storage-choosing stage after it, or expect no saving from it)", DeepsqueezeWarning,
                      stacklevel=3)
    for key in stale:
        del record.encodings[key]


def replay_transforms(model: nn.Module, transforms: list[dict[str, Any]], where: str = "artifact") -> None:
    """Re-apply recorded transforms (from a manifest) to a freshly built base model.

    Each transform's params are checked by the model its kind registered (bounds, types, consistency
    with the module it replaces) before its replay runs; then the checks registered with
    :func:`register_replay_check` run on the result. Every failure is an ``ArtifactError`` naming the
    transform, never a crash or a model whose forward pass would fail.
    """
    from deepsqueeze.core.plugins import load_plugins
    from deepsqueeze.errors import DeepsqueezeError

    load_plugins()
    for index, entry in enumerate(transforms):
        kind = entry.get("kind")
        replay = _REPLAYS.get(kind)  # type: ignore[arg-type]
        if replay is None:
            raise ArtifactError(
                f"{where} uses transform {str(kind)[:40]!r}, which this deepsqueeze does not know: upgrade deepsqueeze"
            )
        target, params = entry["target"], dict(entry.get("params", {}))
        schema = _PARAMS.get(kind)  # type: ignore[arg-type]
        if schema is not None:
            try:
                schema.model_validate(params)
            except pydantic.ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ArtifactError(f"{where} has a malformed manifest: field transforms.{index}.params.{loc} "
                                    f"({kind}): {' '.join(str(err['msg']).split())[:160]}") from None
        try:
            replay(model, target, params)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: transform {index} ({kind} on {target[:80]!r}): {exc}") from None
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError, DeepsqueezeError) as exc:
            msg = " ".join(str(exc).split())[:200]
            raise ArtifactError(f"{where}: cannot replay transform {index} ({kind} on {target[:80]!r}): "
                                f"{type(exc).__name__}: {msg}") from None
        get_record(model).transforms.append(Transform(kind, target, params))

"""What the stages did to a model: structural transforms (replayed on load) and tensor encodings.

The record lives on the root module. A transform is ``(kind, target, params)``: ``kind`` names a
replay function registered by the technique that made it, which rebuilds the module structure
(shapes only) on a freshly built base model so the saved tensors fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from deepsqueeze.errors import ArtifactError

ReplayFn = Callable[[nn.Module, str, dict[str, Any]], None]

_REPLAYS: dict[str, ReplayFn] = {}
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


def register_transform(kind: str) -> Callable[[ReplayFn], ReplayFn]:
    """Register ``replay(root, target, params)`` for transforms of ``kind``."""

    def decorate(fn: ReplayFn) -> ReplayFn:
        _REPLAYS[kind] = fn
        return fn

    return decorate


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
    for key in [k for k in record.encodings if k.startswith(prefix) and k[len(prefix):] not in kept]:
        del record.encodings[key]


def replay_transforms(model: nn.Module, transforms: list[dict[str, Any]]) -> None:
    """Re-apply recorded transforms (from a manifest) to a freshly built base model."""
    from deepsqueeze.core.plugins import load_plugins

    load_plugins()
    for entry in transforms:
        kind = entry.get("kind")
        replay = _REPLAYS.get(kind)  # type: ignore[arg-type]
        if replay is None:
            raise ArtifactError(
                f"artifact uses transform {kind!r}, which this deepsqueeze does not know: upgrade deepsqueeze"
            )
        replay(model, entry["target"], dict(entry.get("params", {})))
        get_record(model).transforms.append(Transform(kind, entry["target"], dict(entry.get("params", {}))))

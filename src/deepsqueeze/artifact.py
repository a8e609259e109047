"""Save a compressed model to a .dsq file and load it back as a runnable module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze import __version__
from deepsqueeze.codec.format import TensorEntry, read_artifact, write_artifact
from deepsqueeze.core.materialize import meta_tensors, skeleton
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import CoverageEntry, get_record, record_encoding, replay_transforms
from deepsqueeze.core.sharing import shared_tensors, tie_tensor
from deepsqueeze.errors import ArtifactError, DeepsqueezeError, ModelError
from deepsqueeze.zoo.resolve import build_base, check_finite


def save(model: Model, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (base reference, recorded transforms, encoded tensors) to ``path``; return bytes.

    The write is atomic, and refuses to replace the artifact the model was loaded from.
    """
    out = Path(path)
    if model.artifact_path and out.exists() and out.resolve() == Path(model.artifact_path).resolve():
        raise ArtifactError(f"refusing to overwrite the input artifact {out}: choose another --out path")
    check_finite(model.module, model.ref)
    record = get_record(model.module)
    state = model.module.state_dict()
    unknown = set(record.encodings) - set(state)
    if unknown:
        raise ArtifactError(f"encodings were recorded for tensors the model does not have: {sorted(unknown)[:3]}")
    entries, ties = tensor_entries(state, record.encodings)
    manifest = manifest_of(model)
    if ties:
        manifest["ties"] = ties
    return write_artifact(out, manifest, entries)


def tensor_entries(state: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]]
                   ) -> tuple[list[TensorEntry], dict[str, str]]:
    """What to store for a state dict: one entry per distinct tensor (with its recorded encoding) and the
    ``{alias: source}`` ties that re-create the shared ones at load."""
    ties = shared_tensors(state)
    entries = []
    for name, tensor in state.items():
        if name in ties:
            continue  # stored once, under the name it was first seen by; re-tied at load
        hint = dict(encodings.get(name, {"encoding": "raw"}))
        entries.append(TensorEntry(name, tensor, hint.pop("encoding"), hint))
    return entries, ties


def manifest_of(model: Model) -> dict[str, Any]:
    """The manifest fields describing ``model``: how to rebuild its base and replay what the stages did."""
    record = get_record(model.module)
    return {
        "creator": f"deepsqueeze {__version__}",
        "base": model.base,
        "ref": model.ref,
        "task": model.task.value,
        "base_params": model.base_params,
        "input_shape": list(model.input_shape) if model.input_shape else None,
        "num_classes": model.num_classes,
        "transforms": [t.to_dict() for t in record.transforms],
        "stages": record.stages,
        "coverage": [entry.to_dict() for entry in record.coverage],
    }


def _skeleton(manifest: dict[str, Any]) -> nn.Module:
    """The base architecture with the recorded transforms replayed, its weights not allocated (meta).

    Lean loading: the fp32 base is never materialized, so a model whose fp32 form does not fit in
    memory loads when its artifact does. Where a constructor or a replay cannot run on the meta device
    (it reads weight values), the skeleton is built the plain way (weights allocated, then replaced).
    """
    try:
        with skeleton():
            module = build_base(manifest["base"])
            replay_transforms(module, manifest["transforms"])
        return module
    except (NotImplementedError, RuntimeError):
        pass  # the named fallback: a full-size build
    module = build_base(manifest["base"])
    replay_transforms(module, manifest["transforms"])
    return module


def load(path: str | os.PathLike[str]) -> Model:
    """Read a .dsq file: rebuild the base architecture, replay the transforms, decode the tensors."""
    contents = read_artifact(path)
    manifest = contents.manifest
    try:
        module = _skeleton(manifest)
        task = Task(manifest["task"])
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} has a malformed manifest ({type(exc).__name__}: {exc})") from None
    except DeepsqueezeError as exc:
        raise ModelError(f"cannot rebuild the base model of {path}: {exc}") from None
    ties = manifest.get("ties") or {}
    if not isinstance(ties, dict) or any(not isinstance(k, str) or v not in contents.tensors for k, v in ties.items()):
        raise ArtifactError(f"{path} has a malformed manifest: 'ties' must map tensor names to stored tensors")
    result = module.load_state_dict(contents.tensors, strict=False, assign=True)  # no copy: tensors go in place
    missing = [k for k in result.missing_keys if k not in ties]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{path} does not fit its base model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    for alias, source in ties.items():
        tie_tensor(module, alias, source)
    unset = meta_tensors(module)
    if unset:
        raise ArtifactError(f"{path} does not fit its base model: no stored value for {unset[:3]}")
    get_record(module).stages = list(manifest.get("stages", []))
    get_record(module).coverage = [CoverageEntry.from_dict(e) for e in manifest.get("coverage", [])]
    for entry in manifest["tensors"]:
        if entry["encoding"] != "raw":
            record_encoding(module, entry["name"], entry["encoding"], **entry.get("params", {}))
    shape = manifest.get("input_shape")
    return Model(
        module.eval(), manifest["base"], task, manifest.get("ref", str(path)), int(manifest["base_params"]),
        tuple(shape) if shape else None, manifest.get("num_classes"), artifact_path=str(path),
        meta={"artifact_bytes": contents.file_bytes, "manifest": manifest},
    )

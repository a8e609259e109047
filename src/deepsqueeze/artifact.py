"""Save a compressed model to a .dsq file and load it back as a runnable module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepsqueeze import __version__
from deepsqueeze.codec.format import TensorEntry, read_artifact, write_artifact
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import CoverageEntry, get_record, record_encoding, replay_transforms
from deepsqueeze.core.sharing import shared_tensors, tie_tensor
from deepsqueeze.errors import ArtifactError, DeepsqueezeError, ModelError
from deepsqueeze.zoo.resolve import ModelCode, build_base, check_finite, validate_base


def save(model: Model, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (base reference, recorded transforms, encoded tensors) to ``path``; return bytes.

    The write is atomic, and refuses to replace the artifact the model was loaded from.
    """
    out = Path(path)
    if model.artifact_path and out.exists() and out.resolve() == Path(model.artifact_path).resolve():
        raise ArtifactError(f"refusing to overwrite the input artifact {out}: choose another --out path")
    validate_base(model.base)  # the writer stores data only: never a reference to code
    check_finite(model.module, model.ref)
    record = get_record(model.module)
    state = model.module.state_dict()
    unknown = set(record.encodings) - set(state)
    if unknown:
        raise ArtifactError(f"encodings were recorded for tensors the model does not have: {sorted(unknown)[:3]}")
    ties = shared_tensors(state)
    entries = []
    for name, tensor in state.items():
        if name in ties:
            continue  # stored once, under the name it was first seen by; re-tied at load
        hint = dict(record.encodings.get(name, {"encoding": "raw"}))
        entries.append(TensorEntry(name, tensor, hint.pop("encoding"), hint))
    manifest: dict[str, Any] = {
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
    if ties:
        manifest["ties"] = ties
    return write_artifact(out, manifest, entries)


def load(path: str | os.PathLike[str], model: ModelCode = None) -> Model:
    """Read a .dsq file: rebuild the base architecture, replay the transforms, decode the tensors.

    A .dsq is data: it never names code to run. Artifacts of models built by your own code
    (``py:`` references) need that code from you: ``model="py:package.module:factory"`` (or a
    zero-argument callable returning the ``nn.Module``), which must build the architecture whose
    fingerprint (submodule names, tensor shapes) the artifact recorded. Zoo, MiniLM and Hugging Face
    bases are rebuilt from the manifest's fields alone; ``model`` is ignored for them.

    Raises:
        ArtifactError: the file is missing, corrupted, malformed or from a newer format.
        ModelError: a ``py`` base and no ``model``, or ``model`` builds a different architecture.
    """
    contents = read_artifact(path)
    manifest = contents.manifest
    base = manifest.get("base")
    if manifest.get("version") == 1 and isinstance(base, dict) and base.get("kind") == "py":
        base = {k: v for k, v in base.items() if k != "factory"}  # format 1 named the code; it is never run
    try:
        module = build_base(base, model)
        replay_transforms(module, manifest["transforms"])
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
    result = module.load_state_dict(contents.tensors, strict=False)
    missing = [k for k in result.missing_keys if k not in ties]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{path} does not fit its base model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    for alias, source in ties.items():
        tie_tensor(module, alias, source)
    get_record(module).stages = list(manifest.get("stages", []))
    get_record(module).coverage = [CoverageEntry.from_dict(e) for e in manifest.get("coverage", [])]
    for entry in manifest["tensors"]:
        if entry["encoding"] != "raw":
            record_encoding(module, entry["name"], entry["encoding"], **entry.get("params", {}))
    shape = manifest.get("input_shape")
    return Model(
        module.eval(), base, task, manifest.get("ref", str(path)), int(manifest["base_params"]),
        tuple(shape) if shape else None, manifest.get("num_classes"), artifact_path=str(path),
        meta={"artifact_bytes": contents.file_bytes, "manifest": manifest},
    )

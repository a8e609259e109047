"""Save a compressed model to a .dsq file and load it back as a runnable module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze._version import __version__
from deepsqueeze.codec.encodings import stored_encoding
from deepsqueeze.codec.format import TensorEntry, decode_entry, read_container, write_artifact
from deepsqueeze.core.materialize import meta_tensors, skeleton
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.outputs import MAX_FLOAT_MAGNITUDE, out_of_range
from deepsqueeze.core.record import (
    CoverageEntry,
    check_loaded_model,
    get_record,
    record_encoding,
    replay_transforms,
)
from deepsqueeze.core.sharing import shared_tensors, tie_tensor
from deepsqueeze.errors import ArtifactError, DeepsqueezeError, ModelError
from deepsqueeze.manifest import validate_manifest
from deepsqueeze.zoo.resolve import ModelCode, build_base, check_base_size, check_finite, validate_base


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
        entries.append(TensorEntry(name, tensor, stored_encoding(hint.pop("encoding"), tensor), hint))
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


def _skeleton(base: dict[str, Any], model_code: ModelCode, transforms: list[dict[str, Any]], where: str) -> nn.Module:
    """The base architecture with the recorded transforms replayed, its weights not allocated (meta).

    Lean loading: the fp32 base is never materialized, so a model whose fp32 form does not fit in
    memory loads when its artifact does. Where a constructor or a replay cannot run on the meta device
    (it reads weight values), the skeleton is built the plain way (weights allocated, then replaced).
    """
    try:
        with skeleton():
            module = build_base(base, model_code)
            replay_transforms(module, transforms, where=where)
        return module
    except (NotImplementedError, RuntimeError, ArtifactError):
        pass  # the named fallback: a full-size build (a malformed transform fails again there)
    module = build_base(base, model_code)
    replay_transforms(module, transforms, where=where)
    return module


def probe_forward(module: nn.Module, task: Task, input_shape: list[int] | None, num_classes: int | None,
                  where: str) -> None:
    """Run the loaded model once on a fixed random probe and require finite outputs (of ``num_classes``
    logits for a classifier): a manifest whose fields are each well-formed but do not fit together (an
    ``input_shape`` the model does not take, a tie or geometry that breaks the forward pass, a finite but
    overflowing scale) is an ``ArtifactError`` at load, never a model that fails or computes NaN later.

    A classifier's probe is a random batch and its negation (a unit a ReLU closes on one is open on the
    other), and outputs must stay within ``MAX_FLOAT_MAGNITUDE``: an output near fp32's limit on the probe
    overflows on another input."""
    from deepsqueeze.core.outputs import output_tensors

    generator = torch.Generator().manual_seed(0)
    if task is Task.CLASSIFIER:
        if not input_shape:
            return
        x = torch.randn(2, *input_shape, generator=generator)
        args: tuple[Any, ...] = (torch.cat([x, -x]),)
        kwargs: dict[str, Any] = {}
    else:
        config = getattr(getattr(module, "transformer", None), "config", None)
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            return
        ids = torch.randint(0, min(vocab, 1000), (1, 8), generator=generator)
        args, kwargs = (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    try:
        with torch.no_grad():
            raw = module.eval()(*args, **kwargs)
            outputs = output_tensors(raw)
    except Exception as exc:  # noqa: BLE001 - whatever the forged model raises, it is the file's fault
        raise ArtifactError(f"{where} does not run ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}): "
                            "its manifest does not fit its model; the file is corrupted or forged") from None
    if any(out_of_range(t) for t in outputs):
        raise ArtifactError(f"{where} computes NaN or Inf (or values beyond {MAX_FLOAT_MAGNITUDE:.1e}) on a probe "
                            "input: the file is corrupted or forged")
    if task is Task.CLASSIFIER and num_classes and isinstance(raw, torch.Tensor) and raw.shape[-1] != num_classes:
        raise ArtifactError(f"{where} gives {raw.shape[-1]} outputs, its manifest says {num_classes} classes: "
                            "the file is corrupted or forged")


def load(path: str | os.PathLike[str], model: ModelCode = None) -> Model:
    """Read a .dsq file: rebuild the base architecture, replay the transforms, decode the tensors.

    A .dsq is data: it never names code to run. Artifacts of models built by your own code
    (``py:`` references) need that code from you: ``model="py:package.module:factory"`` (or a
    zero-argument callable returning the ``nn.Module``), which must build the architecture whose
    fingerprint (submodule names, tensor shapes) the artifact recorded. Zoo, MiniLM and Hugging Face
    bases are rebuilt from the manifest's fields alone; ``model`` is ignored for them.

    The whole manifest is validated first (``deepsqueeze.manifest``); every stored tensor must have the
    name, shape and dtype of the rebuilt model's tensor before any is decoded.

    Raises:
        ArtifactError: the file is missing, corrupted, malformed or from a newer format.
        ModelError: a ``py`` base and no ``model``, or ``model`` builds a different architecture.
    """
    container = read_container(path)
    spec = validate_manifest(container.manifest, container.version, str(path))
    base = spec.base.model_dump(exclude_none=True)
    check_base_size(spec.base, container.file_bytes, str(path))
    try:
        module = _skeleton(base, model, [t.model_dump() for t in spec.transforms], str(path))
    except ArtifactError:
        raise
    except DeepsqueezeError as exc:
        raise ModelError(f"cannot rebuild the base model of {path}: {exc}") from None
    stored = {entry.name: entry for entry in spec.tensors}
    ties = dict(spec.ties)
    expected = module.state_dict()
    for alias, source in ties.items():
        if alias in stored or alias not in expected or source not in stored:
            raise ArtifactError(f"{path} has a malformed manifest: field ties.{alias[:80]}: a tie must map a "
                                "tensor of the model that is not stored to one that is")
        if list(expected[alias].shape) != stored[source].shape or expected[alias].dtype != stored[source].torch_dtype:
            raise ArtifactError(f"{path} has a malformed manifest: field ties.{alias[:80]}: the model's tensor has "
                                f"shape {list(expected[alias].shape)}, the stored {source[:80]!r} "
                                f"{stored[source].shape} {stored[source].dtype}")
    missing = [k for k in expected if k not in stored and k not in ties]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise ArtifactError(f"{path} does not fit its base model: missing {missing[:3]}, "
                            f"unexpected {[k[:80] for k in unexpected[:3]]}")
    for name, entry in stored.items():
        want = expected[name]
        if list(want.shape) != entry.shape or want.dtype != entry.torch_dtype:
            raise ArtifactError(f"{path} does not fit its base model: tensor {name!r} is stored as "
                                f"{entry.shape} {entry.dtype}, the model has {list(want.shape)} "
                                f"{str(want.dtype).removeprefix('torch.')}")
    del expected
    tensors = {name: decode_entry(container, entry) for name, entry in stored.items()}
    for name, tensor in tensors.items():
        if out_of_range(tensor):
            raise ArtifactError(f"{path} holds NaN or Inf values (or values beyond {MAX_FLOAT_MAGNITUDE:.1e}) in "
                                f"{name[:80]!r}: the file is corrupted or forged")
    try:
        module.load_state_dict(tensors, strict=False, assign=True)  # no copy: tensors go in place
    except RuntimeError as exc:
        raise ArtifactError(f"{path} does not fit its base model: {str(exc).splitlines()[-1].strip()[:200]}") from None
    for alias, source in ties.items():
        tie_tensor(module, alias, source)
    unset = meta_tensors(module)
    if unset:
        raise ArtifactError(f"{path} does not fit its base model: no stored value for {unset[:3]}")
    check_loaded_model(module, str(path))
    probe_forward(module, spec.task_enum, spec.input_shape, spec.num_classes, str(path))
    manifest = container.manifest
    get_record(module).stages = list(manifest.get("stages", []))
    get_record(module).coverage = [CoverageEntry.from_dict(e) for e in manifest.get("coverage", [])]
    for entry in spec.tensors:
        if entry.encoding not in ("raw", "narrow-float"):  # the writer's own choices, made again at each save
            record_encoding(module, entry.name, entry.encoding, **(entry.params or {}))
    return Model(
        module.eval(), base, spec.task_enum, spec.ref or str(path), spec.base_params,
        tuple(spec.input_shape) if spec.input_shape else None, spec.num_classes, artifact_path=str(path),
        meta={"artifact_bytes": container.file_bytes, "manifest": manifest},
    )

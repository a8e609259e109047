"""``export``: a loaded model written for a deployment stack, verified before it is reported done.

* ``onnx``: a graph ONNX Runtime runs on CPU with the model's integers (see
  :mod:`deepsqueeze.export.onnx`; what each representation becomes is :mod:`deepsqueeze.runtime.onnx_forms`).
* ``hf``: a float transformer (pruned, layer-dropped, distilled) as a Hugging Face directory with an
  updated config, and for sentence encoders a sentence-transformers directory
  (:mod:`deepsqueeze.export.hf`).
* ``gguf``: a causal LM as one file llama.cpp runs, its codes carried onto llama.cpp's block types
  (:mod:`deepsqueeze.export.gguf`; each representation's tensor: :mod:`deepsqueeze.runtime.gguf_forms`).
* ``pte``: an ExecuTorch program with the XNNPACK delegate, for phones and edge devices
  (:mod:`deepsqueeze.export.pte`; each representation's form: :mod:`deepsqueeze.runtime.pte_forms`).

Every export runs the written model (ONNX Runtime, transformers' ``from_pretrained``, llama.cpp, ExecuTorch's runtime) on a sample
batch and compares its outputs with the torch model's; above tolerance nothing is left at ``out``.
The file or folder appears only once verified (written beside ``out``, then renamed:
:mod:`deepsqueeze.export.check`).

Exporters read the model's modules and ask :mod:`deepsqueeze.runtime` what they become; they import no
technique (quant, prune, share, lowrank, distill). Inside this package, the formats import ``check`` (the graph
exporters ``onnx`` and ``pte`` also ``forms``), and only this driver imports them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from deepsqueeze.core.files import discard
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.signals import deferred_signals
from deepsqueeze.errors import ArtifactError
from deepsqueeze.export.check import (
    MARKER,
    PRODUCER,
    SAMPLES,
    TOLERANCE,
    TOLERANCE_QUANTIZED_ACTIVATIONS,
    ExportResult,
    check_out,
    compare_outputs,
    sample_batch,
    verify,
    write_verified,
)

__all__ = ["BACKENDS", "FORMATS", "MARKER", "PRODUCER", "SAMPLES", "TOLERANCE", "TOLERANCE_QUANTIZED_ACTIVATIONS", "ExportResult", "check_out",
           "compare_outputs", "export", "runnable", "sample_batch", "verify"]

FORMATS = ("onnx", "hf", "gguf", "pte")


def export(model: Model, fmt: str, out: str | os.PathLike[str], *, data: Any = None, sample: Any = None,
           threads: int = 2, overwrite: bool = False) -> ExportResult:
    """Write ``model`` as ``fmt`` (``onnx``, ``hf``, ``gguf`` or ``pte``) to ``out`` and verify it against the torch model.

    ``data``: a resolved dataset to draw the check's sample batch from (see :func:`sample_batch`);
    ``sample``: the batch itself. Raises :class:`ModelError` when the model has no export in ``fmt``
    (naming why) or the exported model's outputs are above tolerance (nothing is written),
    :class:`ArtifactError` for an unusable ``out``.
    """
    if fmt not in FORMATS:
        raise ArtifactError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")

    def write(staged: Path, batch: Any) -> ExportResult:
        if fmt == "onnx":
            from deepsqueeze.export.onnx import export_onnx

            return export_onnx(model, staged, batch, threads)
        if fmt == "gguf":
            from deepsqueeze.export.gguf import write_gguf

            return write_gguf(model, staged, batch, threads)
        if fmt == "pte":
            from deepsqueeze.export.pte import export_pte

            return export_pte(model, staged, batch, threads)
        from deepsqueeze.export.hf import write_hf

        return write_hf(model, staged, batch)

    return write_verified(model, fmt, out, write, data=data, sample=sample, overwrite=overwrite)


#: ``--backend`` -> the export format it runs.
BACKENDS = {"ort": "onnx", "pte": "pte"}


def runnable(model: Model, backend: str, path: str | os.PathLike[str] | None = None, threads: int = 2,
             sample: Any = None) -> Model:
    """``model`` exported (and verified, see :func:`export`) for ``backend`` (``ort``: ONNX in ONNX Runtime,
    ``pte``: an ExecuTorch program) at ``path`` (or a temporary file) and wrapped as a runnable ``Model`` whose
    ``meta["artifact_bytes"]`` is the exported file's size (the .dsq's is ``meta["dsq_bytes"]``).

    A temporary export folder is removed as soon as the runtime holds the model (nothing is left behind, even
    when the export fails). Raises :class:`ArtifactError` for an unknown backend.
    """
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend!r}: use torch, {', '.join(BACKENDS)}")
    fmt = BACKENDS[backend]
    temporary = None
    try:
        if path is None:
            with deferred_signals():
                temporary = Path(tempfile.mkdtemp(prefix=f"deepsqueeze-{backend}-"))
            path = temporary / f"model.{fmt}"
        result = export(model, fmt, path, sample=sample, threads=threads)
        if fmt == "onnx":
            from deepsqueeze.export.onnx import OrtModule as Runner
        else:
            from deepsqueeze.export.pte import PteModule as Runner
        module = Runner(path, model.module, threads)
    finally:
        discard(temporary)
    if model.task is Task.CLASSIFIER:
        module.tokenizer = None
    # what runs is the exported file: its bytes are the artifact's size (the .dsq's stay as dsq_bytes)
    meta = dict(model.meta, backend=backend, exported_path=None if temporary else str(path),
                artifact_bytes=result.bytes, dsq_bytes=model.meta.get("artifact_bytes"), export_check=result.check)
    return Model(module, model.base, model.task, model.ref, model.base_params, model.input_shape, model.num_classes,
                 model.artifact_path, meta)

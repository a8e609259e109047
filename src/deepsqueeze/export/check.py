"""What every export format shares: where an export may be written, the batch it is checked on, the comparison
with the torch model, and the staged write that leaves nothing unverified at ``out``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.config import MAX_THREADS
from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.files import discard, publish
from deepsqueeze.core.model import Model
from deepsqueeze.core.signals import deferred_signals
from deepsqueeze.errors import ArtifactError, DataError, ModelError

__all__ = ["MARKER", "PRODUCER", "PTE_PRODUCER_METHOD", "SAMPLES", "TOLERANCE", "TOLERANCE_QUANTIZED_ACTIVATIONS", "ExportResult", "check_out",
           "RuntimeModule", "compare_outputs", "load_method", "load_program", "quiet_logs", "require_executorch", "sample_batch", "size_of", "verify",
           "write_verified"]

SAMPLES = 16
# worst 1 - cosine between exported and torch outputs, per sample row
TOLERANCE = 1e-4  # float arithmetic on the same weights
TOLERANCE_QUANTIZED_ACTIVATIONS = 2e-2  # integer activations: rounding ties and kernels may differ by a code


@dataclass
class ExportResult:
    """What :func:`export` wrote: ``path``, ``format``, ``bytes`` (file, or all files of a folder), the
    per-module ``layers`` list (ONNX: what each representation became) and the ``check`` against torch."""

    path: str
    format: str
    bytes: int
    layers: list[dict[str, str]] = field(default_factory=list)
    check: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_batch(model: Model, data: Any = None, samples: int = SAMPLES) -> Any:
    """A deterministic input batch: ``samples`` rows of ``data`` (evaluation split) when given, else
    standard-normal images of ``model.input_shape`` (classifiers) or pydoc sentences (text models,
    short and long, tokenized by the model)."""
    if data is not None and model.task.is_text != hasattr(data, "sentences"):
        wanted = "sentences (e.g. --data pydoc-sentences:eval)" if model.task.is_text else "images"
        raise DataError(f"{getattr(data, 'name', data)} does not fit this {model.task.value} model: pass {wanted}")
    if model.task.is_text:
        sentences = getattr(data, "sentences", None)
        if not sentences:
            from deepsqueeze.data.text import load_pydoc_sentences

            sentences = load_pydoc_sentences("eval").sentences
        chosen = sorted(sentences[: samples * 4], key=len)[:: 4][:samples] or ["a"]
        return model.module.tokenize(chosen)
    if data is not None and hasattr(data, "batches"):
        x, _ = next(iter(data.batches("test", batch_size=samples)))
        return x.float()
    if model.input_shape is None:
        raise ModelError("the export check needs the model's input shape: pass --data with the inputs it takes "
                         "(e.g. --data fashion-mnist)")
    return torch.randn(samples, *model.input_shape, generator=torch.Generator().manual_seed(0))


def compare_outputs(ours: Any, theirs: Any, classes: bool = False) -> dict[str, Any]:
    """Worst per-row ``1 - cos``, max absolute error and (``classes``) top-1 agreement of two outputs.

    Outputs may be tensors or containers of them (dicts, tuples, model outputs): their tensors are compared
    pairwise in order, and the worst figures are kept."""
    from deepsqueeze.core.outputs import output_tensors

    a_list, b_list = output_tensors(ours), output_tensors(theirs)
    if len(a_list) != len(b_list):
        return {"shape_mismatch": f"{len(b_list)} outputs instead of {len(a_list)}"}
    if len(a_list) != 1:
        checks = [compare_outputs(a, b, classes and i == 0) for i, (a, b) in enumerate(zip(a_list, b_list, strict=True))]
        for check in checks:
            if "shape_mismatch" in check or "non_finite" in check:
                return check
        worst = dict(checks[0])
        worst["worst_cosine_distance"] = max(c["worst_cosine_distance"] for c in checks)
        worst["max_abs_error"] = max(c["max_abs_error"] for c in checks)
        return worst
    ours, theirs = a_list[0].detach().float().cpu(), b_list[0].detach().float().cpu()
    if ours.shape != theirs.shape:
        return {"shape_mismatch": f"{list(theirs.shape)} instead of {list(ours.shape)}"}
    if not torch.isfinite(theirs).all():
        return {"non_finite": True}
    a, b = ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)
    same = (a == b).all(dim=1)
    distance = torch.where(same, torch.zeros_like(cos), 1 - cos)
    out = {"samples": int(ours.shape[0]), "worst_cosine_distance": float(distance.max()) if len(a) else 0.0,
           "max_abs_error": float((a - b).abs().max()) if a.numel() else 0.0}
    if classes and ours.dim() == 2 and ours.shape[1] > 1:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).double().mean())
    return out


def verify(check: dict[str, Any], runtime: str) -> None:
    """Raise :class:`ModelError` (one line) when ``check`` (:func:`compare_outputs` + ``tolerance``) fails."""
    if "shape_mismatch" in check:
        raise ModelError(f"the exported model's output has shape {check['shape_mismatch']} in {runtime}: not written")
    if check.get("non_finite"):
        raise ModelError(f"the exported model gives NaN or inf in {runtime}: not written")
    if check["worst_cosine_distance"] > check["tolerance"]:
        raise ModelError(f"the exported model disagrees with the torch model in {runtime} (worst 1 - cos "
                         f"{check['worst_cosine_distance']:.2e} > {check['tolerance']:.0e} on {check['samples']} "
                         "samples): not written")


def size_of(path: Path) -> int:
    """Bytes of a file, or of all files of a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


MARKER = "deepsqueeze-export.json"  # written into every hf export: what --force may replace
PRODUCER = "deepsqueeze"  # the producer name of every ONNX export: what --force may replace
PTE_PRODUCER_METHOD = f"{PRODUCER}_export"  # a constant method of every ExecuTorch program written here


def _source_path(source: str | None) -> Path | None:
    if not source:
        return None
    path = Path(source.removeprefix("hf:"))
    return path.resolve() if path.exists() else None


def _is_our_onnx(path: Path) -> bool:
    """A plain file holding an ONNX graph deepsqueeze exported (its producer name says so)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        import onnx

        return onnx.load(str(path), load_external_data=False).producer_name == PRODUCER
    except Exception:  # noqa: BLE001 - not an ONNX file at all: not ours
        return False


def _is_our_gguf(path: Path) -> bool:
    """A plain GGUF file deepsqueeze exported (``general.quantized_by`` says so)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.quantized_by")
        return field is not None and field.contents() == "deepsqueeze"
    except Exception:  # noqa: BLE001 - not a GGUF file at all: not ours
        return False


def _is_our_pte(path: Path) -> bool:
    """A plain file holding an ExecuTorch program deepsqueeze wrote (it has the producer's constant method)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return PTE_PRODUCER_METHOD in load_program(path).method_names
    except Exception:  # noqa: BLE001 - not a program at all (or no ExecuTorch): not ours
        return False


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """ExecuTorch and torchao log optional native libraries they cannot load, and warn about deprecations."""
    loggers = [logging.getLogger(n) for n in ("torchao", "executorch", "torch._export", "torch.export",
                                              "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _native_log_captured() -> Iterator[list[str]]:
    """ExecuTorch's native runtime logs on file descriptor 2 (not Python's stderr): its lines are captured while
    it loads a program (the list holds them once the block ends), and fd 2 restored before anything is printed."""
    sys.stderr.flush()
    saved, lines = os.dup(2), []
    with tempfile.TemporaryFile() as log:
        try:
            os.dup2(log.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode(errors="replace").splitlines())


def require_executorch() -> Any:
    """``executorch.runtime.Runtime`` (ModelError naming the install when ExecuTorch is missing)."""
    try:
        with quiet_logs():
            from executorch.runtime import Runtime
    except ImportError:
        raise ModelError("ExecuTorch export needs executorch: pip install 'deepsqueeze[pte]'") from None
    return Runtime


def load_program(path: Path, threads: int | None = None) -> Any:
    """The ExecuTorch program at ``path`` (``executorch.runtime.Program``), XNNPACK's thread pool set to ``threads``
    when given. The pool is process-wide in ExecuTorch's runtime: programs loaded earlier run on the new size."""
    runtime = require_executorch()
    with quiet_logs():
        from executorch.extension.pybindings import portable_lib

    with _native_log_captured():
        # a reset while earlier programs hold the old pool can leave their threads spinning: only when it differs
        if threads is not None and portable_lib._threadpool_get_thread_count() != int(threads):
            portable_lib._unsafe_reset_threadpool(int(threads))
        return runtime.get().load_program(path)


def load_method(program: Any, name: str = "forward") -> Any:
    """``program``'s method ``name``, initialised (XNNPACK compiles its subgraphs here). ModelError (one line,
    the runtime's own reason) when ExecuTorch's runtime cannot initialise it."""
    try:
        with _native_log_captured() as log:
            return program.load_method(name)
    except RuntimeError as exc:
        why = next((line.split("] ", 1)[-1] for line in log if "fail" in line.lower()), str(exc))
        raise ModelError(f"ExecuTorch's runtime cannot initialise this program ({why[:200]}): not written") from None


def _is_our_folder(path: Path) -> bool:
    return not path.is_symlink() and path.is_dir() and (path / MARKER).is_file() and not (path / MARKER).is_symlink()


def check_out(out: Path, fmt: str, source: str | None, overwrite: bool) -> Path:
    """``out`` resolved, once it can take a ``fmt`` export of the model read from ``source`` (a path or an
    ``hf:DIR`` reference); raises :class:`ArtifactError` otherwise, before any work. ``out`` is never the
    input, a folder holding it or the current folder; an existing ``out`` is replaced only with
    ``overwrite`` and only if it is an earlier export (a ``.onnx``, ``.gguf`` or ``.pte`` file it wrote, a folder with the
    export marker)."""
    if Path(out).is_symlink():
        raise ArtifactError(f"{out} is a symbolic link: deepsqueeze never writes through one; name a plain path")
    out = Path(out).parent.resolve() / Path(out).name
    src = _source_path(source)
    if src is not None and (out == src or out in src.parents):
        raise ArtifactError(f"refusing to replace {out}: it is or holds the input model; choose another --out path")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise ArtifactError(f"refusing to replace {out}, the current folder or one above it: name a new path")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists: choose another --out path or pass --force to replace it")
    ours = {"onnx": _is_our_onnx, "gguf": _is_our_gguf, "pte": _is_our_pte}.get(fmt, _is_our_folder)
    if out.exists() and not ours(out):
        raise ArtifactError(f"--force replaces an earlier export only, and {out} is not one: choose another --out")
    if not out.parent.is_dir():
        raise ArtifactError(f"cannot write {out}: folder {out.parent} does not exist")
    if fmt in ("onnx", "gguf", "pte") and out.suffix != f".{fmt}":
        raise ArtifactError(f"--out must name a .{fmt} file for --format {fmt}, got {out.name}")
    if not os.access(out.parent, os.W_OK):
        raise ArtifactError(f"cannot write {out}: folder {out.parent} is not writable; choose another location")
    return out


def write_verified(model: Model, fmt: str, out: str | os.PathLike[str], write: Callable[[Path, Any], ExportResult], *,
                   data: Any = None, sample: Any = None, overwrite: bool = False) -> ExportResult:
    """Check ``out`` (:func:`check_out`), draw the sample batch (``sample``, else from ``data``), let
    ``write(staged_path, sample)`` write and verify the export beside ``out``, then move it to ``out``.

    Nothing is left at ``out`` (or beside it) when ``write`` raises.
    """
    out = check_out(Path(out), fmt, model.artifact_path or model.ref, overwrite)
    if sample is None:
        sample = sample_batch(model, data)
    staging = None
    try:
        try:
            with deferred_signals():
                staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        except OSError as exc:
            raise ArtifactError(f"cannot write in {out.parent}: {exc.strerror or exc}; choose another location"
                                ) from None
        staged = staging / out.name
        result = write(staged, sample)
        with deferred_signals():
            discard(out)
            publish(staged, out)
    finally:
        discard(staging)
    result.path = str(out)
    return result


class RuntimeModule(nn.Module):
    """What the runners of exported files (ONNX Runtime, ExecuTorch) share: the interface of the module they were
    exported from (``tokenize``, ``encode``, the parameter counts), ``threads`` checked."""

    def __init__(self, like: nn.Module, threads: int, runtime: str) -> None:
        super().__init__()
        if not 1 <= int(threads) <= MAX_THREADS:
            raise ModelError(f"{runtime} threads must be 1..{MAX_THREADS}, got {threads}")
        self.runtime = runtime
        self._params, self._nonzero = count_params(like), count_nonzero_params(like)
        self.tokenizer = getattr(like, "tokenizer", None)
        self.max_seq_length = getattr(like, "max_seq_length", None)
        self._tokenize = getattr(like, "tokenize", None)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenize is None:
            raise ModelError(f"this {self.runtime} model takes no sentences: it has no tokenizer")
        return self._tokenize(sentences)

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        out = [self(**self.tokenize(sentences[i : i + batch_size])) for i in range(0, len(sentences), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def deepsqueeze_param_count(self) -> int:
        return self._params

    def deepsqueeze_nonzero_count(self) -> int:
        return self._nonzero

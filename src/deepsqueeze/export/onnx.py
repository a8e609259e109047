"""ONNX export: the module tree with each representation replaced by its own ONNX form, traced once.

The exporter knows no technique and no representation. It walks the loaded model and asks
:func:`deepsqueeze.runtime.onnx_form` for every module (``Int8Linear``, the packed weight-only layers,
``Int8Conv2d``, ``SparseCSRLinear``, a float layer whose weights are shared, ...), which answers with the
traceable module that emits it (see :mod:`deepsqueeze.runtime.onnx_forms` for the integer operators).
Everything else (float layers, pruned and factored layers, which are already their smaller shapes) is
traced as it is. The result lists, per replaced module, what it became in the graph, so nothing is
exported in a different form without saying so.

Constant folding is off while exporting: folding would turn integer codes and their decode arithmetic
into float initializers and the file would grow back to fp32. ONNX Runtime folds in memory at load.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import ModelError
from deepsqueeze.export.check import (
    PRODUCER,
    TOLERANCE,
    TOLERANCE_QUANTIZED_ACTIVATIONS,
    ExportResult,
    RuntimeModule,
    compare_outputs,
    size_of,
    verify,
)
from deepsqueeze.export.forms import replaced_by_forms, traced_reference
from deepsqueeze.runtime import forced_int8_kernel, onnx_form

if TYPE_CHECKING:
    from deepsqueeze.export.onnx_cache import OrtDecoder

__all__ = ["OrtModule", "export_onnx", "onnx_forms", "reference_outputs", "require_ort", "trace_inputs",
           "write_onnx"]

OPSET = 17


def require_ort() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise ModelError("ONNX export needs onnx and onnxruntime: pip install 'deepsqueeze[onnx]'") from None
    return onnxruntime


def onnx_forms(module: nn.Module) -> tuple[nn.Module, list[dict[str, str]]]:
    """A copy of ``module`` whose representations are replaced by their ONNX forms, and the list of
    ``{"module", "kind", "exported_as"}`` for each replaced one (the original is not changed)."""
    return replaced_by_forms(module, onnx_form, "ONNX")


def trace_inputs(model: Model, sample: Any) -> tuple[tuple[Any, ...], list[str], str, dict[str, dict[int, str]]]:
    """(positional inputs, input names, output name, dynamic axes) for tracing ``model`` on ``sample``.

    ``sample``: a batch tensor for classifiers, a ``tokenize`` dict for text models.
    """
    if model.task.is_text:
        names = ["input_ids", "attention_mask"]
        args = tuple(sample[k] for k in names)
        output = {Task.SENTENCE_ENCODER: "embedding", Task.SEQUENCE_CLASSIFIER: "logits",
                  Task.CAUSAL_LM: "logits"}[model.task]
        dyn = {k: {0: "batch", 1: "tokens"} for k in names}
        dyn[output] = {0: "batch", 1: "tokens"} if model.task is Task.CAUSAL_LM else {0: "batch"}
        return args, names, output, dyn
    return (sample,), ["input"], "logits", {"input": {0: "batch"}, "logits": {0: "batch"}}


def write_onnx(model: Model, path: str | os.PathLike[str], sample: Any, outputs: Any = None) -> list[dict[str, str]]:
    """Trace ``model`` (with its representations' ONNX forms) on ``sample`` and write the graph to ``path``.

    ``outputs``: the torch model's output on ``sample`` where the caller has it (else it is computed once
    to name the graph's outputs). Returns the per-module list of :func:`onnx_forms`. Raises
    :class:`ModelError` when the model cannot be traced (the message names the first failing operation).
    """
    require_ort()
    from deepsqueeze.core.outputs import output_tensors

    shadow, report = onnx_forms(model.module)
    if model.task is Task.CAUSAL_LM:  # with past key-values in and present key-values out
        from deepsqueeze.export.onnx_cache import WithCache, cache_layout, trace_args

        shadow = WithCache(shadow)
        args, names, output_names, dyn = trace_args(sample, cache_layout(model.module.transformer),
                                                    int(model.module.context_length))
    else:
        args, names, output, dyn = trace_inputs(model, sample)
        if outputs is None:
            with torch.no_grad():
                outputs = model.module(*args)
        count = len(output_tensors(outputs))
        output_names = [output] if count == 1 else [f"{output}_{i}" for i in range(count)]
        if count != 1:
            dyn = {k: v for k, v in dyn.items() if k != output} | {o: {0: "batch"} for o in output_names}
    try:
        with torch.no_grad(), warnings.catch_warnings(), _mha_fastpath(False):
            warnings.simplefilter("ignore")  # tracer notes on data-dependent Python branches of transformers
            torch.onnx.export(shadow, args, str(path), input_names=names, output_names=output_names,
                              dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=False,
                              custom_opsets={"com.microsoft": 1} if _uses_contrib(report) else None)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, torch.onnx.errors.OnnxExporterError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"this model cannot be traced to ONNX: {first[:300]}") from None
    return report


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """nn.MultiheadAttention's fused inference kernel has no ONNX export: trace its composite form."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _uses_contrib(report: list[dict[str, str]]) -> bool:
    return any("MatMulNBits" in row["exported_as"] for row in report)


def reference_outputs(model: Model, sample: Any) -> Any:
    """The output the exported file must reproduce (:func:`deepsqueeze.export.forms.traced_reference`)."""
    return traced_reference(model, sample)


def export_onnx(model: Model, path: Path, sample: Any, threads: int = 2) -> ExportResult:
    """Write ``model`` to ``path`` as ONNX and check ONNX Runtime's outputs on ``sample`` against the torch model's
    (:class:`ModelError` above tolerance); :func:`deepsqueeze.export.export` calls it on a staged path."""
    import onnx

    expected = reference_outputs(model, sample)
    layers = write_onnx(model, path, sample, expected)
    graph = onnx.load(str(path))
    graph.producer_name = PRODUCER
    onnx.save(graph, str(path))
    got = OrtModule(path, model.module, threads).run_all(*(
        (sample["input_ids"], sample["attention_mask"]) if isinstance(sample, dict) else (sample,)))
    check = compare_outputs(expected, got, classes=model.task in (Task.CLASSIFIER, Task.SEQUENCE_CLASSIFIER))
    quantized_acts = any("activations" in row["exported_as"] or "QDQ" in row["exported_as"] for row in layers)
    check["tolerance"] = TOLERANCE_QUANTIZED_ACTIVATIONS if quantized_acts else TOLERANCE
    verify(check, "ONNX Runtime")
    if model.task is Task.CAUSAL_LM:
        check["cached_generation"] = _check_cached_generation(model, path, sample, threads, quantized_acts)
    return ExportResult(str(path), "onnx", size_of(path), layers, check)


GENERATION_CHECK_TOKENS = 8
#: A flipped greedy token is a near tie when torch's two logits differ by at most this share of the logit range.
NEAR_TIE = 1e-2


def _check_cached_generation(model: Model, path: Path, sample: Any, threads: int, quantized_acts: bool) -> str:
    """Greedy tokens of ONNX Runtime's cached loop against torch's on the longest sample prompt: equal, or the
    export is refused. With int8 activations a near tie may flip: the first difference is accepted only where
    torch's logits for the two tokens lie within :data:`NEAR_TIE` of the logit range (then said)."""
    ids, mask = sample["input_ids"], sample["attention_mask"]
    row = int(mask.sum(1).argmax())
    prompt = ids[row][mask[row].bool()].tolist()[: max(1, model.module.context_length // 2)]
    with forced_int8_kernel("int_mm"):
        ours = model.module.generate(prompt, max_new_tokens=GENERATION_CHECK_TOKENS, ignore_eos=True).token_ids
    theirs = OrtModule(path, model.module, threads).generate(prompt, max_new_tokens=GENERATION_CHECK_TOKENS,
                                                            ignore_eos=True).token_ids
    if ours == theirs:
        return f"{len(ours)} greedy tokens equal (KV cache)"
    first = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    if quantized_acts:
        with torch.inference_mode(), forced_int8_kernel("int_mm"):
            logits = model.module.transformer(input_ids=torch.tensor([prompt + ours[:first]])).logits[0, -1].float()
        gap = float(logits[ours[first]] - logits[theirs[first]]) / max(float(logits.max() - logits.min()), 1e-12)
        if gap <= NEAR_TIE:
            return (f"{first} greedy tokens equal (KV cache), then a near tie (logit gap {gap:.1e} of the range) "
                    "taken the other way by int8 activations")
    raise ModelError(f"ONNX Runtime's cached generation differs from torch's at new token {first + 1} of "
                     f"{len(ours)}: not written")


class OrtModule(RuntimeModule):
    """An ONNX Runtime session behind the interface of the module it was exported from.

    Text models: ``tokenize``, ``encode(sentences)`` and ``forward(input_ids, attention_mask)``;
    classifiers: ``forward(x)``. Outputs are float32 torch tensors.
    """

    def __init__(self, path: str | os.PathLike[str], like: nn.Module, threads: int = 2) -> None:
        super().__init__(like, threads, "ONNX Runtime")
        ort = require_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = str(path)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self.transformer: OrtDecoder | None = None
        if any(name.startswith("past_key_values.") for name in self._inputs):
            from deepsqueeze.export.onnx_cache import OrtDecoder, cache_layout

            self.transformer = OrtDecoder(self.session, like.transformer.config,  # type: ignore[union-attr]
                                          cache_layout(like.transformer))  # type: ignore[arg-type]
        self.context_length = getattr(like, "context_length", None)

    def run_all(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, in order (a model returning a dict or tuple has several); a cached
        causal-LM graph runs with an empty past and gives its logits."""
        if self.transformer is not None:
            feeds = dict(zip(("input_ids", "attention_mask"), args, strict=False)) | kwargs
            return [self.transformer(feeds["input_ids"], use_cache=False,
                                     attention_mask=feeds.get("attention_mask")).logits]
        feeds = dict(zip(self._inputs, args, strict=False))
        feeds.update({k: v for k, v in kwargs.items() if k in self._inputs})
        return [torch.from_numpy(r) for r in self.session.run(None, {k: v.detach().cpu().numpy()
                                                                     for k, v in feeds.items()})]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.run_all(*args, **kwargs)[0]

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Any:
        """A cached causal-LM graph continues ``prompt`` in ONNX Runtime (:func:`deepsqueeze.zoo.generate.generate`,
        the loop torch runs); ModelError for other graphs."""
        if self.transformer is None:
            raise ModelError("this ONNX model has no KV cache inputs: only causal LMs exported by this version "
                             "generate")
        from deepsqueeze.zoo.generate import generate

        return generate(self, prompt, **kwargs)

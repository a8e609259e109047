"""ExecuTorch export: a ``.pte`` program with the XNNPACK delegate, run by ExecuTorch's runtime before it is reported.

The exporter knows no representation: it asks :func:`deepsqueeze.runtime.pte_form` for every module (the
quantized patterns XNNPACK lowers to its integer kernels, carrying the model's own codes and scales),
exports the result with ``torch.export`` (the batch dimension, and for text models the token dimension,
dynamic), lowers it with ``to_edge_transform_and_lower`` and ``XnnpackPartitioner`` and serializes the
program. What XNNPACK does not take runs on ExecuTorch's portable kernels; the result's ``layers`` say, per
replaced module, what it became and whether XNNPACK runs it, and ``check["delegated"]`` counts the graph's
operators on each side.

Causal language models are refused: their program needs a KV cache (ExecuTorch's ``llama`` export), which
this version does not build yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import ModelError
from deepsqueeze.export.check import (
    PTE_PRODUCER_METHOD,
    TOLERANCE,
    TOLERANCE_QUANTIZED_ACTIVATIONS,
    ExportResult,
    RuntimeModule,
    compare_outputs,
    load_method,
    load_program,
    quiet_logs,
    require_executorch,
    size_of,
    verify,
)
from deepsqueeze.export.forms import replaced_by_forms, traced_reference
from deepsqueeze.runtime import pte_form

__all__ = ["MAX_BATCH", "PteModule", "export_pte", "write_pte"]

MAX_BATCH = 1024  # the program's upper bound on the batch dimension (XNNPACK plans memory for it)


def _inputs(model: Model, sample: Any) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if model.task.is_text:
        longest = int(getattr(model.module, "max_seq_length", None) or sample["input_ids"].shape[1])
        tokens = torch.export.Dim("tokens", min=1, max=max(longest, int(sample["input_ids"].shape[1])))
        return ((sample["input_ids"], sample["attention_mask"]), ({0: batch, 1: tokens}, {0: batch, 1: tokens}))
    return (sample,), ({0: batch},)


def write_pte(model: Model, path: str | os.PathLike[str], sample: Any) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Export ``model`` (its representations' ExecuTorch forms) on ``sample``'s shapes, lower it to XNNPACK and
    write the program to ``path``.

    Returns the per-module list (``module``, ``kind``, ``exported_as``, ``runs_on``) and the operator counts
    (``{"xnnpack_subgraphs": n, "portable": m, "portable_ops": [...]}``). Raises :class:`ModelError` for a causal
    LM, a layer with no ExecuTorch form or one XNNPACK declines (naming it), or a model ``torch.export`` cannot
    capture.
    """
    require_executorch()  # before any work
    if model.task is Task.CAUSAL_LM:
        raise ModelError("ExecuTorch export of causal language models (a program with a KV cache) is not built yet: "
                         "export them with --format gguf (llama.cpp) or --format onnx")
    shadow, layers = replaced_by_forms(model.module, pte_form, "ExecuTorch")
    args, dynamic = _inputs(model, sample)
    with quiet_logs(), torch.no_grad():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        try:
            wrapped = (_TextInputs if model.task.is_text else _Inputs)(shadow)
            program = torch.export.export(wrapped, args, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; the first line says what failed
            raise ModelError(f"this model cannot be captured by torch.export: {_first_line(exc)}") from None
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner(configs=_configs())],
                                               constant_methods={PTE_PRODUCER_METHOD: 1})
            counts = _delegation(edge.exported_program().graph_module, layers)
            buffer = edge.to_executorch().buffer
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - the lowering passes raise many kinds
            raise ModelError(f"ExecuTorch could not lower this model: {_first_line(exc)}") from None
    Path(path).write_bytes(buffer)
    return layers, counts


def _configs() -> list[type]:
    """XNNPACK's partitioner configs, except that an unsqueeze whose output has two dynamic dimensions (batch and
    tokens) stays on the portable kernels: XNNPACK's reshape takes one, and the stock config does not check."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import UnsqueezeCopyConfig
    from torch.fx.experimental.symbolic_shapes import free_symbols

    class OneDynamicDimUnsqueeze(UnsqueezeCopyConfig):
        def check_constraints(self, node: torch.fx.Node, ep: Any) -> bool:
            dynamic = sum(1 for d in node.meta["val"].shape if free_symbols(d))
            return dynamic <= 1 and super().check_constraints(node, ep)

    return [OneDynamicDimUnsqueeze if c is UnsqueezeCopyConfig else c for c in ALL_PARTITIONER_CONFIGS]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


class _Inputs(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x)


class _TextInputs(_Inputs):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:  # type: ignore[override]
        return self.module(input_ids=input_ids, attention_mask=attention_mask)


_SHAPE_OPS = {"sym_size", "sym_numel", "sym_storage_offset", "getitem", "alloc"}  # bookkeeping, not arithmetic


def _delegation(graph: torch.fx.GraphModule, layers: list[dict[str, str]]) -> dict[str, Any]:
    """Operators left to the portable kernels (by name) and the replaced layers they belong to; each row of
    ``layers`` gains ``runs_on``: ``XNNPACK``, or the portable operators the layer also runs.

    Our forms' quantize / dequantize operators have no portable kernel: where XNNPACK declined one, the program
    could not run, and a ModelError names the layers."""
    delegated, portable, owned, declined = 0, [], {}, set()
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        parts = getattr(node.target, "__name__", str(node.target)).split(".")
        name = parts[1] if len(parts) > 1 and parts[0] in ("aten", "quantized_decomposed", "dim_order_ops") else parts[0]
        if "executorch_call_delegate" in str(node.target):
            delegated += 1
            continue
        if name in _SHAPE_OPS:
            continue
        portable.append(name)
        stack = [_module_path(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        for path in stack:
            owned.setdefault(path, set()).add(name)
        if "quantized_decomposed" in str(node.target) and stack:
            declined.add(stack[-1])
    if declined:
        shown = sorted(declined)
        raise ModelError(f"XNNPACK declined the integer form of {', '.join(shown[:3])}"
                         f"{' and more' if len(shown) > 3 else ''}: ExecuTorch has no portable kernel for it")
    for row in layers:
        ops = sorted({op for path, names in owned.items() if path == row["module"] or path.startswith(row["module"] + ".")
                      for op in names})
        row["runs_on"] = "XNNPACK" if not ops else f"XNNPACK + portable {', '.join(ops)}"
    return {"xnnpack_subgraphs": delegated, "portable": len(portable), "portable_ops": sorted(set(portable))}


def _module_path(stack_path: str) -> str:
    """``L['self'].module.fc1`` / ``module.fc1`` (torch.export's module stack) -> ``fc1``."""
    path = stack_path.removeprefix("L['self'].")
    return "" if path == "module" else path.removeprefix("module.")


def export_pte(model: Model, path: Path, sample: Any, threads: int = 2) -> ExportResult:
    """Write ``model`` to ``path`` as an ExecuTorch program and check ExecuTorch's outputs on ``sample`` against the
    torch model's (:class:`ModelError` above tolerance); :func:`deepsqueeze.export.export` calls it on a staged
    path."""
    expected = traced_reference(model, sample)
    layers, counts = write_pte(model, path, sample)
    got = PteModule(path, model.module, threads).run_all(*(
        (sample["input_ids"], sample["attention_mask"]) if isinstance(sample, dict) else (sample,)))
    check = compare_outputs(expected, got, classes=model.task in (Task.CLASSIFIER, Task.SEQUENCE_CLASSIFIER))
    quantized_acts = any("int8 activations" in row["exported_as"] or "static int8" in row["exported_as"]
                         for row in layers)
    check["tolerance"] = TOLERANCE_QUANTIZED_ACTIVATIONS if quantized_acts else TOLERANCE
    check["delegated"] = counts
    verify(check, "ExecuTorch")
    return ExportResult(str(path), "pte", size_of(path), layers, check)


class PteModule(RuntimeModule):
    """An ExecuTorch program behind the interface of the module it was exported from.

    Text models: ``tokenize``, ``encode(sentences)`` and ``forward(input_ids, attention_mask)``; classifiers:
    ``forward(x)``. XNNPACK's thread pool takes ``threads`` (process-wide in ExecuTorch's runtime).
    """

    def __init__(self, path: str | os.PathLike[str], like: nn.Module, threads: int = 2) -> None:
        super().__init__(like, threads, "ExecuTorch")
        self.method = load_method(load_program(Path(path), threads))
        self.path = str(path)

    def run_all(self, *args: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the program, in order."""
        try:
            outputs = self.method.execute([a.detach().cpu().contiguous() for a in args])
        except RuntimeError as exc:
            raise ModelError(f"ExecuTorch's runtime failed to run the program: {_first_line(exc)}") from None
        return [t.clone() for t in outputs]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if kwargs:
            args = (kwargs["input_ids"], kwargs["attention_mask"])
        return self.run_all(*args)[0]

"""Calibration for layer-wise methods (GPTQ, AWQ, SparseGPT, Wanda, sensitivity analysis).

Statistics collection is kept apart from the algorithm that uses it: this module turns a data
split into model inputs, and walks a model layer by layer, handing each target layer's input
Hessian to a ``convert(name, layer, hessian)`` callback that returns the layer's replacement.

Sequential mode quantizes in execution order, so every layer is calibrated on the outputs of the
already-quantized layers before it. For models built from a stack of blocks (a transformer's
``encoder.layer`` list) the block inputs are cached once and only one block runs per step; inside
a block, layers reading the same input (query, key, value) are handled together.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Model
from deepsqueeze.core.progress import track
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError, DeepsqueezeWarning, ModelError

Convert = Callable[[str, nn.Module, torch.Tensor], nn.Module]


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over the rows of a layer's inputs (float64 for stability)."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape (..., columns); every leading index is one sample."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[-1] != self.columns:
            raise ModelError(f"Hessian expects inputs with {self.columns} features, got {x.shape[-1]}")
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ModelError("no calibration inputs reached this layer: check the calibration data and model")
        return (2.0 / self.count) * self.sum


@dataclass
class CalibBatch:
    """One batch of model inputs; ``token_mask`` (batch x tokens) marks real tokens (not padding)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


def calibration_batches(model: Model, data: Any, samples: int = 512, batch_size: int = 32) -> list[CalibBatch]:
    """The first ``samples`` calibration inputs of ``data`` as model-ready batches.

    Images come from the training split; sentences from the given ``TextData`` (for MiniLM that
    is ``pydoc-sentences:calib``, never the eval split), sorted by length to keep padding small.
    Warns (``DeepsqueezeWarning``, naming both counts) when the data holds fewer than ``samples`` inputs.
    """
    batches = _calibration_batches(model, data, samples, batch_size)
    got = sum(_batch_size(b) for b in batches)
    if 0 < got < samples:
        warnings.warn(f"asked for {samples} calibration samples but {data.name} has {got}: calibrating on {got} "
                      "(pass --data with more samples, or set calibration_samples to silence this)",
                      DeepsqueezeWarning, stacklevel=2)
    return batches


def _batch_size(batch: CalibBatch) -> int:
    first = batch.args[0] if batch.args else next(iter(batch.kwargs.values()), None)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0


def _calibration_batches(model: Model, data: Any, samples: int, batch_size: int) -> list[CalibBatch]:
    if data is None:
        raise DataError("this stage needs calibration data: pass --data (e.g. pydoc-sentences:calib or fashion-mnist)")
    if model.task.is_text:
        if not isinstance(data, TextData):
            raise DataError(f"{model.ref} is a {model.task.value}: calibrate it on sentences "
                            f"(pydoc-sentences:calib, wiki:calib or text:FILE), not {data.name}")
        if data.name.endswith(":eval"):
            corpus = data.name.removesuffix(":eval")
            raise DataError(f"{data.name} is reserved for evaluation: calibrate on {corpus}:calib"
                            if corpus in ("pydoc-sentences", "wiki") else
                            f"{data.name} is reserved for evaluation: calibrate on wiki:calib or pydoc-sentences:calib")
        sentences = sorted(data.sentences[:samples], key=len)
        out = []
        for i in range(0, len(sentences), batch_size):
            tokens = model.module.tokenize(sentences[i : i + batch_size])  # type: ignore[operator]
            out.append(CalibBatch((), dict(tokens), tokens["attention_mask"]))
        return out
    if not isinstance(data, ClassificationData):
        raise DataError(f"{model.ref} is a classifier: calibrate it on image data, not {data.name}")
    return [CalibBatch((x,)) for x, _ in data.batches("train", batch_size, limit=samples)]


def layerwise_convert(module: nn.Module, targets: list[str], batches: list[CalibBatch], convert: Convert, *,
                      sequential: bool = True, progress: Callable[[str], None] | None = None) -> None:
    """Replace every layer named in ``targets`` by ``convert(name, layer, hessian)``, in place."""
    if not batches:
        raise DataError("no calibration batches: the calibration data is empty")
    remaining = list(targets)
    with track("calibrating layer by layer", len(targets), "layers") as bar:
        def report(name: str) -> None:
            bar.advance(detail=name)
            if progress is not None:
                progress(name)

        _layerwise_convert(module, remaining, batches, convert, sequential, report)


def _layerwise_convert(module: nn.Module, remaining: list[str], batches: list[CalibBatch], convert: Convert,
                       sequential: bool, progress: Callable[[str], None]) -> None:
    with torch.no_grad():
        if sequential:
            blocks = _find_blocks(module, remaining)
            if blocks is not None:
                prefix, block_list = blocks
                remaining = _convert_blocks(module, prefix, block_list, remaining, batches, convert, progress)
            for group in _execution_groups(module, remaining, batches[0], lambda: _run_model(module, batches[0])):
                hessians = _collect(module, group, batches, lambda b: _run_model(module, b))
                _apply(module, group, hessians, convert, progress)
        elif remaining:
            hessians = _collect(module, remaining, batches, lambda b: _run_model(module, b))
            _apply(module, remaining, hessians, convert, progress)


def _run_model(module: nn.Module, batch: CalibBatch) -> Any:
    return module(*batch.args, **batch.kwargs)


class _Stop(Exception):
    pass


def _find_blocks(module: nn.Module, targets: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of repeated blocks holding the most target layers (at least two blocks)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) < 2:
            continue
        held = sum(1 for t in targets if t.startswith(name + "."))
        if held and (best is None or held > best[0]):
            best = (held, name, child)
    return None if best is None else (best[1], best[2])


def _convert_blocks(module: nn.Module, prefix: str, blocks: nn.ModuleList, targets: list[str],
                    batches: list[CalibBatch], convert: Convert, progress: Callable[[str], None] | None) -> list[str]:
    """Quantize the targets inside ``blocks`` block by block; returns the targets left outside."""
    inputs = _capture_block_inputs(module, blocks[0], batches)
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        inside = [t for t in targets if t.startswith(name + ".")]
        if inside:
            local = [t[len(name) + 1 :] for t in inside]
            first = inputs[0]

            def run_first(block: nn.Module = block, first: tuple = first) -> Any:
                return block(*first[0], **first[1])

            for group in _execution_groups(block, local, batches[0], run_first):
                hessians = _collect(block, group, list(zip(inputs, batches, strict=True)),
                                    lambda item, block=block: block(*item[0][0], **item[0][1]))
                _apply(block, group, hessians, convert, progress, name_prefix=name + ".")
        for i, (args, kwargs) in enumerate(inputs):
            with _token_mask(batches[i].token_mask):
                out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            inputs[i] = ((hidden, *args[1:]), kwargs)
    return [t for t in targets if not t.startswith(prefix + ".")]


def _capture_block_inputs(module: nn.Module, first: nn.Module, batches: list[CalibBatch]) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _run_model(module, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


_MASK: list[torch.Tensor | None] = [None]


@contextmanager
def _token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    _MASK.append(mask)
    try:
        yield
    finally:
        _MASK.pop()


def _real_rows(x: torch.Tensor) -> torch.Tensor:
    """Layer input rows for real tokens only (padding would skew the Hessian)."""
    mask = _MASK[-1]
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x


def _execution_groups(root: nn.Module, targets: list[str], batch: CalibBatch, run: Callable[[], Any]) -> list[list[str]]:
    """Targets in the order they run; layers that read the very same input tensor form one group."""
    if not targets:
        return []
    # the input tensors themselves are kept (not their id()): a freed tensor's id is reused by a later one, which
    # grouped an unrelated layer with the earlier ones at random
    order: list[tuple[str, Any]] = []
    handles = []
    for name in targets:
        def hook(_mod: nn.Module, args: tuple, name: str = name) -> None:
            if not any(n == name for n, _ in order):
                order.append((name, args[0]))

        handles.append(root.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with _token_mask(batch.token_mask):
            run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, tensor in order:
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    unseen = [t for t in targets if not any(n == t for n, _ in order)]
    return groups + ([unseen] if unseen else [])


def _collect(root: nn.Module, names: list[str], items: list, run: Callable[[Any], Any]) -> dict[str, HessianAccumulator]:
    """Input Hessians of the layers ``names`` over every calibration item. Layers that read the very tensor the
    layer before them read (query, key and value; gate and up) share that layer's accumulator: one sum, once."""
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose accumulator holds its (identical) inputs
    last: list[Any] = [None, None, True]  # the input tensor and layer of the latest accumulation; first item
    handles = []
    for name in names:
        layer = root.get_submodule(name)
        columns = _input_features(layer)
        accs[name] = HessianAccumulator(columns)

        def hook(_mod: nn.Module, args: tuple, name: str = name) -> None:
            if name in alias:
                return
            if last[2] and args[0] is last[0] and accs[name].count == 0 and accs[last[1]].columns == accs[name].columns:
                alias[name] = last[1]
                return
            accs[name].add(_real_rows(args[0]))
            last[0], last[1] = args[0], name

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for item in items:
            batch = item[1] if isinstance(item, tuple) else item
            with _token_mask(batch.token_mask):
                run(item)
            last[0], last[2] = None, False  # sharing is decided on the first item only
    finally:
        for h in handles:
            h.remove()
    return {name: accs[alias.get(name, name)] for name in names}


def _input_features(layer: nn.Module) -> int:
    features = getattr(layer, "in_features", None)
    if features is None:
        from deepsqueeze.errors import UnsupportedLayerError

        raise UnsupportedLayerError(f"{type(layer).__name__} has no in_features: layer-by-layer calibration "
                                    "handles Linear layers only")
    return int(features)


def _apply(root: nn.Module, names: list[str], hessians: dict[str, HessianAccumulator], convert: Convert,
           progress: Callable[[str], None] | None, name_prefix: str = "") -> None:
    from deepsqueeze.core.walker import set_submodule

    for name in names:
        layer = root.get_submodule(name)
        new = convert(name_prefix + name, layer, hessians[name].hessian())
        set_submodule(root, name, new)
        if progress is not None:
            progress(name_prefix + name)


def as_calib_batches(batches: list[Any]) -> list[CalibBatch]:
    """Normalise calibration inputs: a tensor is ``module(x)``, a tuple positional arguments, a dict keyword
    arguments (its ``attention_mask`` marks real tokens); ``CalibBatch`` items pass through."""
    out = []
    for batch in batches:
        if isinstance(batch, CalibBatch):
            out.append(batch)
        elif isinstance(batch, torch.Tensor):
            out.append(CalibBatch((batch,)))
        elif isinstance(batch, dict):
            out.append(CalibBatch((), dict(batch), batch.get("attention_mask")))
        elif isinstance(batch, (tuple, list)):
            out.append(CalibBatch(tuple(batch)))
        else:
            raise DataError(f"cannot feed a calibration batch of type {type(batch).__name__} to the model")
    return out

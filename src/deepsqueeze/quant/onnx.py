"""ONNX export of quantized models and an ONNX Runtime backed module with the original's interface.

``export_onnx(model, path)`` writes a graph that ONNX Runtime executes with integer operators:

1. the quantized modules are expanded to float modules holding exactly their dequantized weights
   (the int8 codes times their scales), and the model is exported with the TorchScript exporter;
2. for BERT-style sentence encoders, ONNX Runtime's transformer optimizer fuses attention, LayerNorm
   (+ residual), GELU and the embedding block (``optimize=True``);
3. the layers that were :class:`~deepsqueeze.quant.modules.Int8Linear` become ``MatMulInteger`` /
   ``QAttention`` with per-channel int8 weights (ONNX Runtime's dynamic quantizer: re-quantizing the
   dequantized weights gives back exactly our codes, since both use ``max|w| / 127`` per channel) and
   dynamic per-tensor uint8 activations (``DynamicQuantizeLinear``).

Step 3 executes the ``per_tensor`` activation scheme, so a model quantized with
``Int8DynamicConfig(activations="per_tensor")`` gives the same outputs in torch and in ONNX Runtime up
to rounding; a ``per_token`` model runs there with per-tensor activations (its weights are unchanged).
Weight-only packed layers are exported dequantized (float). ``OrtModule`` / ``ort_model`` wrap a
session so ``evaluate`` (and ``--backend ort``) can score it like any module.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import ModelError
from deepsqueeze.quant.modules import (
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
)

__all__ = ["OrtModule", "export_onnx", "float_shadow", "ort_model"]


def _require_ort() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise ModelError("ONNX export needs onnx and onnxruntime: pip install 'deepsqueeze[onnx]'") from None
    return onnxruntime


def float_shadow(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A float copy of ``module`` whose layers hold the dequantized weights of its quantized layers.

    Returns the copy and the names of the layers that were int8 W8A8 (to run as integer ops).
    """
    shadow = copy.deepcopy(module)
    int8_layers = []
    for name, layer in list(shadow.named_modules()):
        new: nn.Module | None = None
        if isinstance(layer, (Int8Linear, PackedIntLinear)):
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            new.weight.data = layer.dequantized_weight().clone()
            if layer.bias is not None:
                new.bias.data = layer.bias.clone()
            if isinstance(layer, Int8Linear):
                int8_layers.append(name)
        elif isinstance(layer, (Int8Embedding, PackedIntEmbedding)):
            new = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx)
            new.weight.data = layer.dequantized_weight().clone()
        elif isinstance(layer, (Int8Conv2d, PackedIntConv2d)):
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,  # type: ignore[arg-type]
                             layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None)  # type: ignore[arg-type]
            conv.weight.data = layer.dequantized_weight().clone()
            if layer.bias is not None:
                conv.bias.data = layer.bias.clone()
            new = nn.Sequential(conv, nn.ReLU()) if getattr(layer, "relu", False) else conv
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(shadow.get_submodule(parent) if parent else shadow, child, new)
    return shadow.eval(), int8_layers


def _is_encoder(module: nn.Module) -> bool:
    return hasattr(module, "tokenize") and hasattr(module, "transformer")


def export_onnx(model: Model | nn.Module, path: str | os.PathLike[str], *, optimize: bool = True,
                quantize: bool = True, example: Any = None, opset: int = 17) -> Path:
    """Write ``model`` as ONNX to ``path`` (integer operators for its int8 layers; see the module doc).

    ``example`` is an input for tracing (classifiers: a batch tensor; default: zeros of
    ``model.input_shape``); sentence encoders trace on two tokenized sentences.
    """
    _require_ort()
    module = model.module if isinstance(model, Model) else model
    shadow, int8_layers = float_shadow(module)
    out = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        if _is_encoder(module):
            tokens = module.tokenize(["an example sentence for tracing", "and another one"])  # type: ignore[operator]
            args: tuple = (tokens["input_ids"], tokens["attention_mask"])
            names, dyn = ["input_ids", "attention_mask"], {"input_ids": {0: "batch", 1: "tokens"},
                                                            "attention_mask": {0: "batch", 1: "tokens"},
                                                            "embedding": {0: "batch"}}
            output = "embedding"
        else:
            if example is None:
                shape = model.input_shape if isinstance(model, Model) else None
                if shape is None:
                    raise ModelError("ONNX export needs the model's input shape: pass --data with the images it "
                                     "takes (e.g. fashion-mnist), give the module an input_shape attribute, or "
                                     "in Python pass export_onnx(..., example=batch)")
                example = torch.zeros(2, *shape)
            args, names, output = (example,), ["input"], "logits"
            dyn = {"input": {0: "batch"}, "logits": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(shadow, args, str(raw), input_names=names, output_names=[output], dynamic_axes=dyn,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        current = raw
        if optimize and _is_encoder(module):
            current = _optimize_bert(module, raw, Path(tmp) / "opt.onnx")
        if quantize and int8_layers:
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = Path(tmp) / "q.onnx"
            quantize_dynamic(str(current), str(quantized), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Attention"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            _weights_to_uint8(quantized, out)
        else:
            out.write_bytes(current.read_bytes())
    return out


def _optimize_bert(module: nn.Module, src: Path, dst: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    config = module.transformer.config  # type: ignore[union-attr]
    optimized = optimize_model(str(src), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=0)
    optimized.save_model_to_file(str(dst))
    return dst


def _weights_to_uint8(src: Path, dst: Path) -> None:
    """Store the symmetric int8 weight codes ``q`` as uint8 ``q + 128`` with zero point 128 (same values).

    On x86 without VNNI, ONNX Runtime's uint8 x int8 kernels add pairs of products in int16 and
    saturate (the reason its docs suggest ``reduce_range``, i.e. 7-bit weights); its uint8 x uint8
    kernels do not. The shift keeps our codes exact and avoids the saturation.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {init.name: init for init in model.graph.initializer}
    slots = {"MatMulInteger": (1, 3), "QAttention": (1, 7)}  # (weight input, weight zero-point input)
    done: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in slots:
            continue
        w_slot, z_slot = slots[node.op_type]
        if len(node.input) <= z_slot:
            continue
        w_name, z_name = node.input[w_slot], node.input[z_slot]
        if w_name not in inits or z_name not in inits:
            continue
        for name, shift in ((w_name, True), (z_name, False)):
            if name in done:
                continue
            array = numpy_helper.to_array(inits[name])
            if array.dtype != np.int8:
                continue
            if not shift and np.any(array != 0):
                raise ModelError(f"expected symmetric int8 weights in the ONNX graph, {name} has non-zero zero points")
            new = (array.astype(np.int16) + 128).astype(np.uint8)
            inits[name].CopyFrom(numpy_helper.from_array(new, name))
            done.add(name)
    onnx.save(model, str(dst))


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the interface of the module it was exported from.

    Sentence encoders: ``tokenize``, ``encode(sentences)`` and ``forward(input_ids, attention_mask)``;
    classifiers: ``forward(x)``. Outputs are float32 torch tensors.
    """

    def __init__(self, path: str | os.PathLike[str], like: nn.Module, threads: int = 2) -> None:
        super().__init__()
        ort = _require_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = str(path)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._params, self._nonzero = count_params(like), count_nonzero_params(like)
        self.tokenizer = getattr(like, "tokenizer", None)
        self.max_seq_length = getattr(like, "max_seq_length", None)
        self._tokenize = getattr(like, "tokenize", None)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        if self._tokenize is None:
            raise ModelError("this ONNX model is not a sentence encoder: it has no tokenizer")
        return self._tokenize(sentences)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self._inputs, args, strict=False))
        feeds.update({k: v for k, v in kwargs.items() if k in self._inputs})
        result = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})[0]
        return torch.from_numpy(result)

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        out = [self(**self.tokenize(sentences[i : i + batch_size])) for i in range(0, len(sentences), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def deepsqueeze_param_count(self) -> int:
        return self._params

    def deepsqueeze_nonzero_count(self) -> int:
        return self._nonzero


def ort_model(model: Model, path: str | os.PathLike[str] | None = None, threads: int = 2, **export: Any) -> Model:
    """``model`` exported to ONNX (to ``path``, or a temporary file) and wrapped as a runnable ``Model``.

    A temporary export folder is removed as soon as the session holds the model (nothing is left behind,
    even when the export fails).
    """
    temporary = None
    if path is None:
        temporary = Path(tempfile.mkdtemp(prefix="deepsqueeze-ort-"))
        path = temporary / "model.onnx"
    try:
        export_onnx(model, path, **export)
        module = OrtModule(path, model.module, threads)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if model.task is Task.CLASSIFIER:
        module.tokenizer = None
    return Model(module, model.base, model.task, model.ref, model.base_params, model.input_shape, model.num_classes,
                 model.artifact_path, dict(model.meta, backend="ort", onnx_path=None if temporary else str(path)))

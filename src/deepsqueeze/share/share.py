"""Weight sharing (Deep Compression, step 2) and entropy coding of the shared tensors (step 3).

``share`` clusters each Linear/Conv weight's non-zero values into at most ``2**bits`` centroids, writes
the centroid values into the dense weight (so the model stays an ordinary runnable module whose
weights take few distinct values), and optionally fine-tunes the centroids: during fine-tuning each
weight is a parametrization ``centroids[index]`` (zero where pruned), so autograd's gather backward
sums the gradients of every weight sharing a centroid, exactly Han et al.'s update; indices never
change. It records the ``sparse-codebook`` (or dense ``codebook``) encoding for each shared weight.

``encode`` switches those records to ``sparse-codebook-entropy`` (entropy-coded indices and
positions). Loading decodes the codebook values bit-exactly, so the loaded model computes exactly
what the compressed model computed.
"""

from __future__ import annotations

import fnmatch
import time
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepsqueeze import runtime
from deepsqueeze.codec.codebook import analyze
from deepsqueeze.codec.encodings import half_precision, stored_encoding
from deepsqueeze.core.config import register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.core.encoding import get_encoding
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.progress import track
from deepsqueeze.core.record import get_record, record_encoding
from deepsqueeze.core.walker import has_empty_weight
from deepsqueeze.data.datasets import ClassificationData
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.primitives.kmeans import assign, exact_1d, init_centroids, lloyd
from deepsqueeze.share.config import EncodeConfig, FloatStorage, Method, ShareConfig

SHAREABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
CODEBOOK_ENCODINGS = ("codebook", "codebook-entropy", "sparse-codebook", "sparse-codebook-entropy")
# Below this fraction of zeros a shared weight is stored densely (an index for every entry).
SPARSE_MIN_SPARSITY = 0.1


def shareable_layers(module: nn.Module, include: list[str] | None = None,
                     exclude: list[str] | None = None) -> dict[str, nn.Module]:
    """Linear/Conv layers (by name) whose weights the ``share`` stage clusters."""
    out = {}
    for name, sub in module.named_modules():
        if not name or not isinstance(sub, SHAREABLE_TYPES) or has_empty_weight(sub):
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out[name] = sub
    return out


def layer_bits(name: str, layer: nn.Module, config: ShareConfig) -> int:
    """Codebook bits of one layer: name override, then layer-type bits, then the default."""
    for pattern, bits in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and config.conv_bits is not None:
        return config.conv_bits
    if isinstance(layer, nn.Linear) and config.linear_bits is not None:
        return config.linear_bits
    return config.bits


def cluster(values: torch.Tensor, k: int, method: Method | str = Method.LLOYD, init: str = "linear",
            iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Sorted float64 centroids (at most ``k``) for the 1-D ``values``."""
    if Method(method) is Method.EXACT:
        return exact_1d(values, k)
    return lloyd(values, init_centroids(values, k, init, seed), iterations)


def _shared_tensors(module: nn.Module, config: ShareConfig) -> list[tuple[str, nn.Module, str, int]]:
    """``(layer name, layer, "weight" | "bias", bits)`` for every tensor the stage clusters."""
    out = []
    for name, layer in shareable_layers(module, config.include, config.exclude).items():
        out.append((name, layer, "weight", layer_bits(name, layer, config)))
        if config.bias_bits is not None and getattr(layer, "bias", None) is not None:
            out.append((name, layer, "bias", config.bias_bits))
    return out


def share_weights_(module: nn.Module, config: ShareConfig, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Cluster every shareable tensor in place; return per tensor name (``"fc1.weight"``)
    ``{bits, k, centroids, indices, mask}``. Weights cluster their non-zeros (pruned weights stay
    zero); biases (with ``bias_bits``) cluster all their entries."""
    out: dict[str, dict[str, Any]] = {}
    tensors = _shared_tensors(module, config)
    with track("k-means weight sharing", len(tensors), "tensors") as bar:
        for name, layer, attr, bits in tensors:
            _share_one(out, name, layer, attr, bits, config, seed)
            bar.advance(detail=f"{name}.{attr}")
    return out


def _share_one(out: dict[str, dict[str, Any]], name: str, layer: nn.Module, attr: str, bits: int,
               config: ShareConfig, seed: int) -> None:
    tensor = getattr(layer, attr)
    with torch.no_grad():
        mask = tensor != 0 if attr == "weight" else torch.ones_like(tensor, dtype=torch.bool)
        values = tensor[mask]
        if values.numel() == 0:
            return
        centroids = cluster(values.cpu(), 1 << bits, config.method, config.init.value, config.iterations,
                            seed).to(tensor.dtype)
        centroids = torch.unique(centroids)  # centroids that coincide after rounding merge
        idx = assign(values.cpu(), centroids).to(tensor.device)
        centroids = centroids.to(tensor.device)
        tensor[mask] = centroids[idx]
        full_idx = torch.zeros(tensor.shape, dtype=torch.long, device=tensor.device)
        full_idx[mask] = idx
    out[f"{name}.{attr}"] = {"bits": bits, "k": int(centroids.numel()), "centroids": centroids,
                             "indices": full_idx, "mask": mask.clone()}


def finetune_centroids(model: Model, ctx: StageContext, config: ShareConfig,
                       shared: dict[str, dict[str, Any]]) -> float:
    """Train the centroids (and unshared biases) with indices fixed and pruned weights at zero; then
    write the trained shared values back into plain dense tensors."""
    if config.epochs <= 0 or not shared:
        return float("nan")
    if ctx.data is None:
        raise DataError(f"the share stage fine-tunes centroids for {config.epochs} epochs and needs training "
                        "data: pass --data (or set epochs: 0)")
    module = model.module
    params: list[nn.Parameter] = []
    for key, info in shared.items():
        name, attr = key.rsplit(".", 1)
        layer = module.get_submodule(name)
        parametrize.register_parametrization(
            layer, attr, runtime.CodebookWeight(info["centroids"], info["indices"], info["mask"]), unsafe=True)
        params.append(getattr(layer.parametrizations, attr)[0].centroids)
    if config.train_biases:
        for name in {key.rsplit(".", 1)[0] for key in shared}:
            layer = module.get_submodule(name)
            if f"{name}.bias" not in shared and getattr(layer, "bias", None) is not None:
                params.append(layer.bias)
    from deepsqueeze.train import finetune_model

    try:
        stats = finetune_model(model, ctx, batch_size=config.batch_size, limit=config.limit,
                               what="centroid fine-tuning", epochs=config.epochs, lr=config.lr,
                               optimizer=config.optimizer.value, schedule=config.lr_schedule.value, params=params)
    finally:
        for key, info in shared.items():
            name, attr = key.rsplit(".", 1)
            layer = module.get_submodule(name)
            info["centroids"] = getattr(layer.parametrizations, attr)[0].centroids.detach().clone()
            parametrize.remove_parametrizations(layer, attr, leave_parametrized=True)
    return float(stats["loss"])


def _accuracy(module: nn.Module, data: Any) -> float | None:
    """Test-split top-1 accuracy for the stage report (None for non-classification data)."""
    if not isinstance(data, ClassificationData):
        return None
    module.eval()
    correct = total = 0
    device = next(module.parameters()).device
    with torch.no_grad():
        for x, y in data.batches("test", 1000):
            correct += int((module(x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


def payload_bytes(module: nn.Module) -> int:
    """Bytes of every state-dict tensor under its recorded encoding (the .dsq file adds its header and
    manifest to this)."""
    encodings = get_record(module).encodings
    total = 0
    for name, tensor in module.state_dict().items():
        hint = dict(encodings.get(name, {"encoding": "raw"}))
        encoding = stored_encoding(hint.pop("encoding"), tensor)
        _, segments = get_encoding(encoding).encode(tensor.detach().cpu(), **hint)
        total += sum(len(s) for s in segments)
    return total


def measure(model: Model, ctx: StageContext) -> dict[str, Any]:
    """``bytes`` (tensor payload under the recorded encodings), ``ratio`` against fp32 and ``accuracy``
    (unless the run does not evaluate: ``ctx.evaluate``)."""
    size = payload_bytes(model.module)
    out: dict[str, Any] = {"bytes": size, "ratio": round(4 * model.base_params / max(size, 1), 2)}
    acc = _accuracy(model.module, ctx.data) if ctx.evaluate else None
    if acc is not None:
        out["accuracy"] = round(acc, 4)
    return out


def _fill_previous_row(model: Model, ctx: StageContext) -> None:
    """Give the previous stage's report row (e.g. pruning) its bytes, ratio and accuracy if it has none."""
    if ctx.report and "bytes" not in ctx.report[-1]:
        ctx.report[-1].update(measure(model, ctx))


def _record_codebook_encodings(module: nn.Module, names: list[str]) -> None:
    state = module.state_dict()
    for name in names:
        tensor = state[name]
        sparsity = 1.0 - int(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)
        sparse = name.endswith(".weight") and sparsity >= SPARSE_MIN_SPARSITY
        record_encoding(module, name, "sparse-codebook" if sparse else "codebook")


def _bits_range(bits: list[int]) -> str:
    lo, hi = min(bits), max(bits)
    return str(lo) if lo == hi else f"{lo}-{hi}"


@register_stage(ShareConfig)
def share_stage(model: Model, config: ShareConfig, ctx: StageContext) -> None:
    """Apply a ``share`` stage: cluster, fine-tune centroids, record codebook storage, report."""
    _fill_previous_row(model, ctx)
    start = time.perf_counter()
    shared = share_weights_(model.module, config, ctx.seed)
    if not shared:
        raise RecipeError("the share stage found no Linear/Conv weights to cluster: check include/exclude")
    cluster_s = time.perf_counter() - start
    loss = finetune_centroids(model, ctx, config, shared)
    if config.centroid_dtype == FloatStorage.FLOAT16:
        state = model.module.state_dict()
        with torch.no_grad():
            for name in shared:  # rounding the values rounds the centroids: zeros stay zero
                state[name].copy_(half_precision(state[name]))
    _record_codebook_encodings(model.module, list(shared))
    ctx.report.append({
        "stage": "share", "shared_tensors": len(shared), "bits": _bits_range([i["bits"] for i in shared.values()]),
        "cluster_s": round(cluster_s, 3), "train_loss": None if loss != loss else round(loss, 5),
        **measure(model, ctx),
    })


@register_stage(EncodeConfig)
def encode_stage(model: Model, config: EncodeConfig, ctx: StageContext) -> None:
    """Apply an ``encode`` stage: entropy-code every codebook tensor; report the coded streams against
    their Shannon bounds (totals in the report row, per tensor in ``ctx.extras["encode_streams"]``)."""
    _fill_previous_row(model, ctx)
    module = model.module
    record = get_record(module)
    names = [n for n, e in record.encodings.items() if e.get("encoding") in CODEBOOK_ENCODINGS]
    if not names:
        raise RecipeError("the encode stage found no weight-shared tensors: put a share stage before it")
    start = time.perf_counter()
    state = module.state_dict()
    rounded = _round_other_floats(state, record.encodings) if config.float_dtype == FloatStorage.FLOAT16 else 0
    streams = []
    for name in names:
        sparse = record.encodings[name]["encoding"] != "codebook"
        params = {}
        if sparse and config.positions.value != "auto":
            params["positions"] = config.positions.value
        if config.coder.value != "auto":
            params["coder"] = config.coder.value
        encoding = "sparse-codebook-entropy" if sparse else "codebook-entropy"
        record_encoding(module, name, encoding, **params)
        streams.append(analyze(name, state[name], encoding, **params).as_dict())
    ctx.extras["encode_streams"] = streams  # per tensor: bytes and Shannon bound of every stream
    ctx.report.append({
        "stage": "encode",
        "index_bytes": sum(s["index_bytes"] for s in streams),
        "index_shannon_bytes": round(sum(s["index_shannon_bytes"] for s in streams)),
        "position_bytes": sum(s["position_bytes"] for s in streams),
        "gap_shannon_bytes": round(sum(s["gap_shannon_bytes"] for s in streams)),
        "encode_s": round(time.perf_counter() - start, 3), **({"float16_tensors": rounded} if rounded else {}),
        **measure(model, ctx),
    })


def _round_other_floats(state: dict[str, torch.Tensor], encodings: dict[str, dict[str, Any]]) -> int:
    """Round, in place, every float32 tensor of ``state`` stored as is (no recorded encoding) to 16-bit floats;
    return how many (tied tensors once)."""
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.dtype == torch.float32 and encodings.get(name, {"encoding": "raw"})["encoding"] == "raw" \
                    and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                tensor.copy_(half_precision(tensor))
    return len(seen)


def as_model(model: Model | nn.Module) -> Model:
    """Wrap a bare module so the stage handlers can take it (classifier task, no data)."""
    if isinstance(model, Model):
        return model
    return Model(model, {"kind": "module"}, Task.CLASSIFIER, type(model).__name__, count_params(model))


def share_(model: Model | nn.Module, config: ShareConfig, ctx: StageContext | None = None) -> Model:
    """Weight-share ``model`` in place (centroid fine-tuning needs ``ctx.data``); return the handle."""
    handle = as_model(model)
    share_stage(handle, config, ctx if ctx is not None else StageContext(handle, progress=False))
    return handle


def encode_(model: Model | nn.Module, config: EncodeConfig | None = None, ctx: StageContext | None = None) -> Model:
    """Switch a weight-shared model's storage to the entropy-coded forms, in place."""
    handle = as_model(model)
    encode_stage(handle, config or EncodeConfig(), ctx if ctx is not None else StageContext(handle, progress=False))
    return handle


# old home of the codebook parametrization (deprecated, see deepsqueeze.runtime)
__getattr__ = moved_to(__name__, {runtime: ["CodebookWeight"]})

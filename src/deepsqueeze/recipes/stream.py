"""Compress a Hugging Face model larger than memory: weight-only quantization streamed block by block.

``compress --stream`` (or :func:`compress_streaming`) builds the model's module tree without weights,
reads the embeddings and head from the directory's (sharded) safetensors files, then quantizes the
transformer blocks one at a time (:func:`deepsqueeze.quant.stream.quantize_blockwise_`): each block is
read, calibrated on the cached outputs of the block before it, quantized, written to the artifact and
released. The layers outside the block stack (embedding table, head) are quantized last by
round-to-nearest, which needs no activations. Peak memory is those layers, one block in fp32 and the
calibration activations, whatever the model's depth; the .dsq is assembled from a spool file.

Each quantized block runs on every calibration batch before the artifact is written, so a written
artifact has run; the recipe must be a single weight-only ``quantize`` stage (rtn, gptq, awq).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.artifact import manifest_of, tensor_entries
from deepsqueeze.codec.format import ArtifactWriter
from deepsqueeze.core.calibrate import calibration_batches
from deepsqueeze.core.config import config_to_dict
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.coverage import coverage_totals
from deepsqueeze.core.model import Model, tied_aliases
from deepsqueeze.core.record import get_record
from deepsqueeze.core.skeleton import bounded_heap, empty_weights, release_
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.quant import QuantizeConfig, quantize_
from deepsqueeze.quant.stream import WEIGHT_ONLY_METHODS, block_stack, quantize_blockwise_
from deepsqueeze.recipes.run import CompressResult, check_out_path, training_data
from deepsqueeze.recipes.schema import Recipe
from deepsqueeze.zoo.checkpoint import ShardedCheckpoint
from deepsqueeze.zoo.hf import detect_hf_task
from deepsqueeze.zoo.resolve import build_base, check_finite
from deepsqueeze.zoo.st_modules import head_state, read_pipeline
from deepsqueeze.zoo.strict_load import derived_constants


def stream_config(recipe: Recipe) -> QuantizeConfig:
    """The recipe's one weight-only quantize stage (RecipeError for any other recipe)."""
    stages = list(recipe.stages)
    if len(stages) != 1 or not isinstance(stages[0], QuantizeConfig) \
            or stages[0].method.value not in WEIGHT_ONLY_METHODS:
        raise RecipeError("--stream runs one weight-only quantize stage (method "
                          f"{', '.join(WEIGHT_ONLY_METHODS)}), e.g. --recipe w4-gptq")
    return stages[0]


def skeleton(ref: str) -> tuple[Model, ShardedCheckpoint]:
    """The model ``hf:DIR`` with its parameters on the meta device, and its checkpoint reader."""
    if not ref.startswith("hf:"):
        raise ModelError(f"--stream reads Hugging Face directories (hf:DIR), not {ref}")
    folder = Path(ref[3:]).resolve()
    task = detect_hf_task(folder)
    checkpoint = ShardedCheckpoint(folder)
    base = {"kind": "hf", "path": str(folder), "task": task.value}
    with empty_weights():
        module = build_base(base).eval()
    return Model(module, base, task, ref, count_params(module)), checkpoint


def compress_streaming(model_ref: str | None, recipe: Recipe, out: str | Path, data_ref: str | None = None, *,
                       progress: bool = True) -> CompressResult:
    """Quantize ``hf:DIR`` block by block into ``out`` (see the module docstring); returns what happened."""
    from deepsqueeze.runtime import reference_kernels
    from deepsqueeze.train.loop import seed_everything

    config = stream_config(recipe)
    if model_ref is None and recipe.model is not None:
        from deepsqueeze.resolve import check_file_reference

        check_file_reference(recipe.model, "the recipe's model")
    model_ref = model_ref or recipe.model
    if model_ref is None:
        raise RecipeError("no model given: pass --model hf:DIR or set 'model:' in the recipe")
    out = check_out_path(out, model_ref)
    seed_everything(recipe.seed)
    bounded_heap()
    start = time.perf_counter()
    model, checkpoint = skeleton(model_ref)
    root = model.module
    prefix, _ = block_stack(root)
    names = _checkpoint_names(root, checkpoint)
    head = _head_state(root, Path(model.base["path"]))
    _check_complete(root, names, head, checkpoint, model_ref)
    names = _untied_copies(root, names, checkpoint, model_ref)
    root.load_state_dict(head, strict=False, assign=True)
    _materialize(root, names, lambda key: not key.startswith(prefix + "."), checkpoint)
    data = training_data(model, data_ref or recipe.data)
    batches = calibration_batches(model, data, samples=config.calibration_samples)
    record = get_record(root)
    stage_index = len(record.stages)
    with ArtifactWriter(out) as writer:

        def before(name: str, block: nn.Module) -> None:
            _materialize(root, names, lambda key: key.startswith(name + "."), checkpoint)

        def after(name: str, block: nn.Module) -> None:
            state = block.state_dict(prefix=name + ".")
            check_finite(block, f"{model_ref} ({name})")
            entries, ties = tensor_entries(state, record.encodings)
            if ties:
                raise ModelError(f"{name} shares tensors between its layers: quantize it without --stream")
            for entry in entries:
                writer.add(entry)
            release_(block)

        def report(done: int, total: int) -> None:
            if progress:
                print(f"stage 1/1 quantize (streamed): block {done}/{total}", flush=True, file=sys.stderr)

        with reference_kernels():  # later blocks' inputs come through the quantized ones: same bytes everywhere
            quantize_blockwise_(root, config, batches, before_block=before, after_block=after, progress=report)
        rest = QuantizeConfig(**{**config.model_dump(), "method": "rtn", "exclude": (*config.exclude, f"{prefix}.*")})
        quantize_(root, rest)
        record.stages.append(config_to_dict(config))
        state = {k: v for k, v in root.state_dict().items() if not k.startswith(prefix + ".")}
        for key, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ModelError(f"model {model_ref} has NaN or Inf values in {key}: fix or retrain the weights")
        entries, ties = tensor_entries(state, record.encodings)
        for entry in entries:
            writer.add(entry)
        manifest = manifest_of(model)
        if ties:
            manifest["ties"] = ties
        size = writer.finish(manifest)
    report_row: dict[str, Any] = {"stage": "quantize", "stage_index": stage_index, "streamed": True,
                                  "seconds": round(time.perf_counter() - start, 2)}
    return CompressResult(model, str(out), size, 4 * model.base_params / size, [report_row], {},
                          time.perf_counter() - start, coverage_totals(record.coverage))


def _checkpoint_names(root: nn.Module, checkpoint: ShardedCheckpoint) -> dict[str, str]:
    """Model state-dict key -> checkpoint tensor name, for every key the checkpoint holds.

    Wrappers keep the transformers model as ``transformer``; checkpoints of ``*ForCausalLM`` models name
    the base model's tensors with or without its ``base_model_prefix``.
    """
    available = set(checkpoint.names())
    transformer = getattr(root, "transformer", None)
    base_prefix = getattr(transformer, "base_model_prefix", "") if transformer is not None else ""
    mapping: dict[str, str] = {}
    for key in root.state_dict(keep_vars=True):
        inner = key.removeprefix("transformer.")
        candidates = [inner]
        if base_prefix:
            candidates += [inner.removeprefix(base_prefix + "."), f"{base_prefix}.{inner}"]
        for candidate in candidates:
            if candidate in available:
                mapping[key] = candidate
                break
    return mapping


def _head_state(root: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """A sentence encoder's head weights (Dense, LayerNorm), read from its sentence-transformers module folders."""
    head = getattr(root, "head", None)
    pipeline = read_pipeline(folder)
    if head is None or pipeline is None:
        return {}
    return head_state(pipeline, list(head), prefix="head.")


def _check_complete(root: nn.Module, names: dict[str, str], head: dict[str, torch.Tensor],
                    checkpoint: ShardedCheckpoint, ref: str) -> None:
    """Strict loading before any work: every model tensor has a checkpoint tensor (or is tied to one that
    has) and every checkpoint tensor is used, except the constants transformers recomputes (derived_constants)."""
    aliases = tied_aliases(root)
    missing = [k for k in root.state_dict(keep_vars=True)
               if k not in names and k not in head and not (k in aliases and aliases[k] in names)]
    if missing:
        raise ModelError(f"{ref} has no weight for {missing[0]}" + (f" (and {len(missing) - 1} more)" if
                         len(missing) > 1 else "") + " (transformers would initialise it at random): save the "
                         "complete model with save_pretrained")
    shapes = checkpoint.shapes()
    for key, tensor in root.state_dict(keep_vars=True).items():
        if key in names and shapes.get(names[key]) != list(tensor.shape):
            raise ModelError(f"{ref} holds {names[key]} of shape {shapes.get(names[key])}, the model its config.json "
                             f"describes needs {list(tensor.shape)}: the config does not fit the weights; save "
                             "config and weights together with save_pretrained")
    transformer = getattr(root, "transformer", None)
    ignored = derived_constants(transformer) if transformer is not None else []
    used = set(names.values())
    unexpected = [n for n in checkpoint.names() if n not in used and not any(re.search(p, n) for p in ignored)]
    if unexpected:
        raise ModelError(f"{ref} holds tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if
                         len(unexpected) > 1 else "") + f", which the {type(transformer).__name__} it loads as "
                         "does not use: save the model without it")


def _untied_copies(root: nn.Module, names: dict[str, str], checkpoint: ShardedCheckpoint, ref: str) -> dict[str, str]:
    """``names`` without the second name of a tied tensor the checkpoint also holds (an equal copy: the tie
    stays); a different copy is refused, as the in-memory loader refuses it."""
    out = dict(names)
    for alias, target in tied_aliases(root).items():
        if alias in names and target in names:
            pair = checkpoint.read([names[alias], names[target]])
            if not torch.equal(pair[names[alias]], pair[names[target]]):
                raise ModelError(f"{ref}: config.json ties {names[alias]} to {names[target]} (tie_word_embeddings), "
                                 "but the files hold a different one: set tie_word_embeddings to false in "
                                 "config.json to use the files' head, or save the model again with save_pretrained")
            del out[alias]
    return out


def _materialize(root: nn.Module, names: dict[str, str], wanted: Any, checkpoint: ShardedCheckpoint) -> None:
    """Load the checkpoint tensors of the keys ``wanted(key)`` selects into ``root`` (replacing meta ones)."""
    keys = [k for k in names if wanted(k)]
    tensors = checkpoint.read([names[k] for k in keys])
    state = {k: tensors[names[k]] for k in keys}
    root.load_state_dict(state, strict=False, assign=True)
    transformer = getattr(root, "transformer", None)
    if transformer is not None and callable(getattr(transformer, "tie_weights", None)):
        transformer.tie_weights()
    missing = [k for k, v in root.state_dict(keep_vars=True).items() if wanted(k) and v.device.type == "meta"]
    if missing:
        raise ModelError(f"the checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more): "
                         "is it complete?")

"""Weight-only quantization one block at a time, for models larger than memory.

A transformer is an embedding, a stack of repeated blocks and a head. :func:`quantize_blockwise_`
captures the calibration inputs of the first block once, then for each block in turn: asks the caller to
materialize it (``before_block``: e.g. read its tensors from sharded safetensors), quantizes it with the
ordinary :func:`~deepsqueeze.quant.api.quantize_` verb on those inputs (so RTN, GPTQ and AWQ give the
blocks exactly what they give in memory, where GPTQ also calibrates block by block), runs the quantized
block to produce the next block's inputs, and hands it back (``after_block``: e.g. write its tensors to
the artifact and release them). Peak memory is the non-block weights, one block, and the cached
activations (calibration samples x tokens x hidden size), whatever the depth.

This is the layer-wise scheme of GPTQ's reference implementation (Frantar et al., 2022, which quantizes
OPT-175B on one GPU block by block) applied to memory rather than device placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.calibrate import (
    CalibBatch,
    _capture_block_inputs,
    _find_blocks,
    _token_mask,
    as_calib_batches,
)
from deepsqueeze.core.record import CoverageEntry, Transform, get_record
from deepsqueeze.errors import RecipeError, UnsupportedLayerError
from deepsqueeze.quant.api import quantize_
from deepsqueeze.quant.config import QuantizeConfig

BlockHook = Callable[[str, nn.Module], None]

WEIGHT_ONLY_METHODS = ("rtn", "gptq", "awq")


def block_stack(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of ``module``'s repeated blocks (the list holding the most Linear layers).

    Raises UnsupportedLayerError when the model has no stack of at least two blocks.
    """
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    found = _find_blocks(module, linears)
    if found is None:
        raise UnsupportedLayerError(f"{type(module).__name__} has no stack of repeated blocks to stream: "
                                    "quantize it in memory (without --stream)")
    return found


def quantize_blockwise_(module: nn.Module, config: QuantizeConfig, batches: list[Any], *,
                        before_block: BlockHook | None = None, after_block: BlockHook | None = None,
                        progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Quantize the blocks of ``module`` in place one at a time; returns the replaced layers' full names.

    ``config`` must be a weight-only method (``rtn``, ``gptq``, ``awq``); ``batches`` are calibration
    inputs of the whole model (tensors, kwargs dicts or ``CalibBatch``). The modules outside the block
    stack are left as they are: quantize them afterwards (round-to-nearest needs no activations).
    Everything the blocks' quantization records (transforms, tensor encodings, coverage) is moved to
    ``module``'s record under the full names, as if ``quantize_`` had run on the whole model.
    ``before_block(name, block)`` runs before a block is first used, ``after_block(name, block)`` once
    it is final; ``progress(done, total)`` after each block.

    Raises RecipeError for a method that needs the whole model, UnsupportedLayerError without blocks.
    """
    if config.method.value not in WEIGHT_ONLY_METHODS:
        raise RecipeError(f"streaming quantizes weights only: use method {', '.join(WEIGHT_ONLY_METHODS)}, "
                          f"not {config.method.value}")
    prefix, blocks = block_stack(module)
    calib = as_calib_batches(batches)
    replaced: list[str] = []
    with torch.no_grad():
        inputs = _capture_block_inputs(module, blocks[0], calib)
        for index, block in enumerate(blocks):
            name = f"{prefix}.{index}"
            if before_block is not None:
                before_block(name, block)
            block_batches = [CalibBatch(args, kwargs, calib[i].token_mask) for i, (args, kwargs) in enumerate(inputs)]
            replaced += [f"{name}.{n}" for n in quantize_(block, config, block_batches)]
            _move_record(block, module, name)
            for i, (args, kwargs) in enumerate(inputs):
                with _token_mask(calib[i].token_mask):
                    out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                inputs[i] = ((hidden, *args[1:]), kwargs)
            if after_block is not None:
                after_block(name, block)
            if progress is not None:
                progress(index + 1, len(blocks))
    return replaced


def _move_record(block: nn.Module, root: nn.Module, name: str) -> None:
    local, full = get_record(block), get_record(root)
    full.transforms += [Transform(t.kind, f"{name}.{t.target}", t.params) for t in local.transforms]
    full.encodings.update({f"{name}.{k}": v for k, v in local.encodings.items()})
    full.coverage += [CoverageEntry(**{**c.to_dict(), "module": f"{name}.{c.module}"}) for c in local.coverage]
    local.transforms.clear()
    local.encodings.clear()
    local.coverage.clear()

"""Which transformer blocks to remove: Block Influence, measured on calibration sentences.

Men et al. 2024 ("ShortGPT: Layers in Large Language Models are More Redundant Than You Expect") score each
block by how little it changes the hidden state it is given: ``BI_i = 1 - E[cos(h_i, h_{i+1})]`` over the
real (unpadded) tokens, ``h_i`` the block's input and ``h_{i+1}`` its output. A block whose output nearly
equals its input is the cheapest to remove; the ``count`` lowest-scoring blocks go.
"""

from __future__ import annotations

from typing import Any

import torch

from deepsqueeze.core.calibrate import calibration_batches
from deepsqueeze.core.model import Model
from deepsqueeze.errors import RecipeError, UnsupportedLayerError


def block_influence(model: Model, data: Any, samples: int) -> dict[str, float]:
    """Block name -> Block Influence (0 = the block changes nothing, up to 2) of every transformer block of
    ``model``, averaged over the real tokens of the first ``samples`` sentences of ``data``.

    Raises:
        UnsupportedLayerError: a model whose hidden states are not one per block plus the embeddings (several
            stacks, a shared block) or without a ``transformer`` to run.
        DataError: ``data`` is not sentences (from :func:`~deepsqueeze.core.calibrate.calibration_batches`).
    """
    from deepsqueeze.prune.transformer import find_blocks

    names = [b.layer for b in find_blocks(model.module)]
    transformer = getattr(model.module, "transformer", None)
    if not names or transformer is None:
        raise UnsupportedLayerError(f"{model.ref} has no stack of transformer blocks deepsqueeze can score: "
                                    "name the blocks to remove in drop_layers")
    sums = torch.zeros(len(names), dtype=torch.float64)
    tokens = 0
    was_training = transformer.training
    transformer.eval()
    try:
        with torch.inference_mode():
            for batch in calibration_batches(model, data, samples=samples, batch_size=8):
                hidden = transformer(**batch.kwargs, output_hidden_states=True).hidden_states
                if len(hidden) != len(names) + 1:
                    raise UnsupportedLayerError(
                        f"{model.ref} returns {len(hidden)} hidden states for {len(names)} blocks (several stacks or "
                        "a shared block): name the blocks to remove in drop_layers")
                keep = batch.token_mask.bool()
                for i in range(len(names)):
                    cos = torch.nn.functional.cosine_similarity(hidden[i][keep].double(), hidden[i + 1][keep].double(),
                                                                dim=-1)
                    sums[i] += float((1 - cos).sum())
                tokens += int(keep.sum())
    finally:
        transformer.train(was_training)
    return {name: float(s) / max(tokens, 1) for name, s in zip(names, sums.tolist(), strict=True)}


def least_influential(influence: dict[str, float], count: int, exclude: list[str]) -> list[str]:
    """The ``count`` blocks of lowest influence, not in ``exclude`` (already removed), in model order.

    Raises ``RecipeError`` when that would leave no block."""
    candidates = [n for n in influence if n not in set(exclude)]
    if count >= len(candidates):
        raise RecipeError(f"drop_blocks {count} would remove all {len(candidates)} remaining blocks: keep at least one")
    chosen = set(sorted(candidates, key=lambda n: (influence[n], n))[:count])
    return [n for n in influence if n in chosen]

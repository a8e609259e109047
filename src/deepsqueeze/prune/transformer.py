"""Structured pruning of BERT-style transformer blocks (MiniLM): attention heads, FFN neurons, whole layers.

A block is found by structure, not by class: a self-attention module has ``query``/``key``/``value``
Linears and ``attention_head_size``; its sibling ``output.dense`` consumes the heads. A layer with
``intermediate.dense`` and ``output.dense`` has an FFN. Heads and neurons are cut with the generic
Linear surgery (recorded as ``prune_channels`` cuts), the head count with an ``attention_heads``
transform, dropped layers with ``drop_layers``: ``deepsqueeze.load`` replays all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.record import (
    KeptIndices,
    Size,
    TransformParams,
    record_transform,
    register_model_check,
    register_transform,
)
from deepsqueeze.core.walker import get_submodule
from deepsqueeze.errors import ArtifactError, RecipeError, UnsupportedLayerError
from deepsqueeze.prune.importance import ElementCriterion, channel_scores, magnitude_l2
from deepsqueeze.prune.surgery import cut_


@dataclass
class TransformerBlock:
    layer: str  # the block (e.g. "transformer.encoder.layer.0")
    attention: str | None  # the self-attention module with query/key/value
    attention_out: str | None  # the Linear consuming the concatenated heads
    ffn_in: str | None  # intermediate Linear (hidden -> ffn)
    ffn_out: str | None  # output Linear (ffn -> hidden)


def find_blocks(root: nn.Module) -> list[TransformerBlock]:
    """BERT-style blocks of ``root``, in module order."""
    blocks = []
    for name, mod in root.named_modules():
        attn = getattr(mod, "attention", None)
        if attn is None or not isinstance(getattr(getattr(mod, "intermediate", None), "dense", None), nn.Linear):
            continue
        self_attn = getattr(attn, "self", None)
        prefix = f"{name}." if name else ""
        ok_attn = self_attn is not None and all(isinstance(getattr(self_attn, p, None), nn.Linear)
                                                for p in ("query", "key", "value"))
        ok_out = isinstance(getattr(getattr(attn, "output", None), "dense", None), nn.Linear)
        blocks.append(TransformerBlock(
            name,
            f"{prefix}attention.self" if ok_attn else None,
            f"{prefix}attention.output.dense" if ok_attn and ok_out else None,
            f"{prefix}intermediate.dense",
            f"{prefix}output.dense" if isinstance(getattr(getattr(mod, "output", None), "dense", None), nn.Linear)
            else None,
        ))
    return blocks


def _head_scores(root: nn.Module, block: TransformerBlock, criterion: ElementCriterion) -> torch.Tensor:
    attn = get_submodule(root, block.attention)  # type: ignore[arg-type]
    size, heads = attn.attention_head_size, attn.num_attention_heads
    total = torch.zeros(heads)
    for proj in ("query", "key", "value"):
        total += channel_scores(criterion(getattr(attn, proj).weight, None), 0).reshape(heads, size).sum(1).cpu()
    out = get_submodule(root, block.attention_out)  # type: ignore[arg-type]
    total += channel_scores(criterion(out.weight, None), 1).reshape(heads, size).sum(1).cpu()
    return total


def prune_heads_(root: nn.Module, block: TransformerBlock, n_remove: int,
                 criterion: ElementCriterion = magnitude_l2) -> list[int]:
    """Remove the ``n_remove`` lowest-scoring heads of ``block``; return the kept head indices."""
    if block.attention is None or block.attention_out is None:
        raise UnsupportedLayerError(f"{block.layer} has no query/key/value attention with an output projection")
    attn = get_submodule(root, block.attention)
    heads, size = attn.num_attention_heads, attn.attention_head_size
    if not 0 <= n_remove < heads:
        raise RecipeError(f"cannot remove {n_remove} of the {heads} heads of {block.layer}: keep at least one")
    scores = _head_scores(root, block, criterion)
    kept = sorted(int(i) for i in torch.sort(scores, descending=True, stable=True).indices[:heads - n_remove])
    if n_remove == 0:
        return kept
    rows = [h * size + j for h in kept for j in range(size)]
    for proj in ("query", "key", "value"):
        cut_(root, f"{block.attention}.{proj}", "out", rows)
    cut_(root, block.attention_out, "in", rows)
    _set_heads(attn, len(kept))
    record_transform(root, "attention_heads", block.attention, heads=len(kept))
    return kept


def _set_heads(attn: nn.Module, heads: int) -> None:
    attn.num_attention_heads = heads
    attn.all_head_size = heads * attn.attention_head_size


class HeadsParams(TransformParams):
    heads: Size


@register_transform("attention_heads", params=HeadsParams)
def _replay_heads(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    try:
        _set_heads(get_submodule(root, target), int(params["heads"]))
    except (AttributeError, KeyError) as exc:
        raise ArtifactError(f"cannot replay head pruning of {target!r}: {exc}") from None


def prune_ffn_(root: nn.Module, block: TransformerBlock, ratio: float,
               criterion: ElementCriterion = magnitude_l2) -> list[int]:
    """Remove ``ratio`` of the FFN neurons of ``block`` (rows of the intermediate Linear, columns of the output)."""
    if block.ffn_in is None or block.ffn_out is None:
        raise UnsupportedLayerError(f"{block.layer} has no intermediate/output FFN pair")
    fc_in, fc_out = get_submodule(root, block.ffn_in), get_submodule(root, block.ffn_out)
    n = fc_in.out_features
    keep = n - int(round(ratio * n))
    scores = channel_scores(criterion(fc_in.weight, None), 0).cpu() + channel_scores(criterion(fc_out.weight, None),
                                                                                     1).cpu()
    kept = sorted(int(i) for i in torch.sort(scores, descending=True, stable=True).indices[:keep])
    if keep < n:
        cut_(root, block.ffn_in, "out", kept)
        cut_(root, block.ffn_out, "in", kept)
    return kept


def drop_layers_(root: nn.Module, layers: list[str]) -> None:
    """Remove whole blocks (entries of the ModuleList that holds them); record it for replay."""
    by_parent: dict[str, list[int]] = {}
    for name in layers:
        parent, _, index = name.rpartition(".")
        container = get_submodule(root, parent)
        if not isinstance(container, nn.ModuleList) or not index.isdigit() or int(index) >= len(container):
            raise UnsupportedLayerError(f"cannot drop {name}: only entries of a ModuleList (stacked blocks) can go")
        by_parent.setdefault(parent, []).append(int(index))
    for parent, drop in by_parent.items():
        container = get_submodule(root, parent)
        keep = [i for i in range(len(container)) if i not in set(drop)]
        if not keep:
            raise RecipeError(f"dropping {sorted(drop)} would leave {parent} empty: keep at least one block")
        _keep_entries(root, parent, keep)
        record_transform(root, "drop_layers", parent, keep=keep)


def _keep_entries(root: nn.Module, parent: str, keep: list[int]) -> None:
    container = get_submodule(root, parent)
    kept = nn.ModuleList([container[i] for i in keep])
    grand, _, attr = parent.rpartition(".")
    setattr(get_submodule(root, grand), attr, kept)
    owner_config = getattr(get_submodule(root, grand), "config", None)
    if owner_config is not None and hasattr(owner_config, "num_hidden_layers"):
        owner_config.num_hidden_layers = len(kept)


class KeepParams(TransformParams):
    keep: KeptIndices


@register_transform("drop_layers", params=KeepParams)
def _replay_drop(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    try:
        _keep_entries(root, target, [int(i) for i in params["keep"]])
    except (AttributeError, KeyError, IndexError) as exc:
        raise ArtifactError(f"cannot replay layer dropping of {target!r}: {exc}") from None


@register_model_check
def _heads_fit_the_projections(root: nn.Module) -> str | None:
    """A replayed head count must match the query/key/value widths, or attention's reshape fails."""
    for name, module in root.named_modules():
        heads, size = getattr(module, "num_attention_heads", None), getattr(module, "attention_head_size", None)
        if not isinstance(heads, int) or not isinstance(size, int):
            continue
        for proj in ("query", "key", "value"):
            width = getattr(getattr(module, proj, None), "out_features", None)
            if width is not None and width != heads * size:
                return (f"{name} has {heads} heads of {size} but its {proj} projection is {width} wide "
                        "(transform attention_heads does not fit the weights)")
    return None

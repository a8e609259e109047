"""Structured pruning of transformer blocks: attention heads, FFN neurons, whole layers.

Blocks are found by structure, not by class, for the layouts of the common Hugging Face families:

===================  ==========================================  ==============================
family               attention (projections -> output)           FFN (in -> out)
===================  ==========================================  ==============================
BERT, RoBERTa, ...   ``attention.self.query/key/value`` ->        ``intermediate.dense`` ->
                     ``attention.output.dense``                   ``output.dense``
ALBERT (shared)      ``attention.query/key/value`` -> ``.dense``  ``ffn`` -> ``ffn_output``
DistilBERT           ``attention.q_lin/k_lin/v_lin`` -> ``out_lin`` ``ffn.lin1`` -> ``ffn.lin2``
GPT-2                ``attn.c_attn`` (fused q|k|v, Conv1D) ->     ``mlp.c_fc`` -> ``mlp.c_proj``
                     ``attn.c_proj``
Llama, Mistral,      ``self_attn.q_proj/k_proj/v_proj`` ->        ``mlp.gate_proj`` + ``up_proj``
Qwen2 (GQA)          ``self_attn.o_proj``                         -> ``mlp.down_proj``
===================  ==========================================  ==============================

Grouped-query attention (``kv_heads < heads``) is pruned so the grouping stays valid: removing ``n``
heads takes ``n / kv_heads`` query heads from every KV group when that divides, otherwise ``n / G``
whole KV groups (``G = heads / kv_heads``: the group's key/value heads and its query heads), otherwise
it is refused. A shared block (ALBERT) is pruned once and every use sees the cut. Heads and neurons
are cut with the generic surgery (recorded as ``prune_channels`` cuts; transformers' ``Conv1D`` has
its own rule), head counts with an ``attention_heads`` transform, dropped layers with ``drop_layers``:
``deepsqueeze.load`` replays all three. Scores are weight magnitudes (Michel et al. 2019 prune heads
by importance; here the L1/L2 norm of each head's projection rows and output columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """Where one block's attention and FFN live (module names relative to the root).

    ``attention`` is the module holding the head-count attributes; ``q``/``k``/``v`` its separate
    projections, or ``qkv`` one fused projection (q|k|v along its outputs); ``attention_out`` consumes
    the concatenated heads. ``ffn_in`` produces the FFN neurons (``ffn_gate`` too, for gated FFNs) and
    ``ffn_out`` consumes them. ``heads``/``kv_heads``/``head_dim`` are the current sizes.
    """

    layer: str
    attention: str | None
    attention_out: str | None
    ffn_in: str | None
    ffn_out: str | None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    ffn_gate: str | None = None
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    family: str = "bert"
    extra: dict[str, Any] = field(default_factory=dict)


def _is_conv1d(m: nn.Module | None) -> bool:
    return m is not None and type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _is_proj(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _out_features(m: nn.Module) -> int:
    return int(m.nf) if _is_conv1d(m) else int(m.out_features)  # type: ignore[arg-type]


def _child(mod: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        mod = getattr(mod, part, None)  # type: ignore[assignment]
        if not isinstance(mod, nn.Module):
            return None
    return mod


# family -> (attention module, q, k, v, fused qkv, attention out, ffn in, ffn gate, ffn out); paths in the block
_LAYOUTS: dict[str, tuple[str, str | None, str | None, str | None, str | None, str, str, str | None, str]] = {
    "bert": ("attention.self", "query", "key", "value", None, "attention.output.dense", "intermediate.dense",
             None, "output.dense"),
    "albert": ("attention", "query", "key", "value", None, "attention.dense", "ffn", None, "ffn_output"),
    "distilbert": ("attention", "q_lin", "k_lin", "v_lin", None, "attention.out_lin", "ffn.lin1", None,
                   "ffn.lin2"),
    "gpt2": ("attn", None, None, None, "c_attn", "attn.c_proj", "mlp.c_fc", None, "mlp.c_proj"),
    "llama": ("self_attn", "q_proj", "k_proj", "v_proj", None, "self_attn.o_proj", "mlp.up_proj", "mlp.gate_proj",
              "mlp.down_proj"),
}


def _head_dim(attn: nn.Module, q_out: int) -> int:
    for attr in ("attention_head_size", "head_dim"):
        value = getattr(attn, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "n_heads", None) or getattr(
        attn, "num_heads", None)
    if isinstance(heads, int) and heads > 0:
        return q_out // heads
    raise UnsupportedLayerError(f"{type(attn).__name__} has no head size attribute: cannot prune its heads")


def _match(mod: nn.Module, name: str) -> TransformerBlock | None:
    prefix = f"{name}." if name else ""
    for family, (attn_p, q, k, v, qkv, out, ffn_in, gate, ffn_out) in _LAYOUTS.items():
        attn = _child(mod, attn_p)
        ffn_ok = _is_proj(_child(mod, ffn_in)) and _is_proj(_child(mod, ffn_out)) and (
            gate is None or _is_proj(_child(mod, gate)))
        if attn is None or not ffn_ok:
            continue
        attn_ok = _is_proj(_child(mod, out)) and (
            _is_proj(_child(attn, qkv)) if qkv else all(_is_proj(_child(attn, p)) for p in (q, k, v)))  # type: ignore[arg-type]
        block = TransformerBlock(
            layer=name, attention=f"{prefix}{attn_p}" if attn_ok else None,
            attention_out=f"{prefix}{out}" if attn_ok else None, ffn_in=f"{prefix}{ffn_in}",
            ffn_out=f"{prefix}{ffn_out}", ffn_gate=f"{prefix}{gate}" if gate else None, family=family)
        if attn_ok:
            if qkv:
                block.qkv = f"{prefix}{attn_p}.{qkv}"
                q_out = _out_features(_child(attn, qkv)) // 3  # type: ignore[arg-type]
                k_out = q_out
            else:
                block.q, block.k, block.v = (f"{prefix}{attn_p}.{p}" for p in (q, k, v))  # type: ignore[misc]
                q_out = _out_features(_child(attn, q))  # type: ignore[arg-type]
                k_out = _out_features(_child(attn, k))  # type: ignore[arg-type]
            block.head_dim = _head_dim(attn, q_out)
            block.heads, block.kv_heads = q_out // block.head_dim, k_out // block.head_dim
        return block
    return None


def find_blocks(root: nn.Module) -> list[TransformerBlock]:
    """Transformer blocks of ``root`` (any family in the module docstring's table), in module order.

    A block reused in several places (ALBERT's shared layer) is listed once.
    """
    blocks = []
    for name, mod in root.named_modules():
        block = _match(mod, name)
        if block is not None:
            blocks.append(block)
    return blocks


# ------------------------------------------------------------------------------------------ scores


def _rows(root: nn.Module, name: str, criterion: ElementCriterion) -> torch.Tensor:
    """Score of each output channel of a Linear / Conv1D."""
    m = get_submodule(root, name)
    return channel_scores(criterion(m.weight, None), 1 if _is_conv1d(m) else 0).cpu().float()


def _cols(root: nn.Module, name: str, criterion: ElementCriterion) -> torch.Tensor:
    """Score of each input channel of a Linear / Conv1D."""
    m = get_submodule(root, name)
    return channel_scores(criterion(m.weight, None), 0 if _is_conv1d(m) else 1).cpu().float()


def _qkv_scores(root: nn.Module, block: TransformerBlock, criterion: ElementCriterion
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if block.qkv is not None:
        rows = _rows(root, block.qkv, criterion)
        n = len(rows) // 3
        return rows[:n], rows[n : 2 * n], rows[2 * n :]
    return (_rows(root, block.q, criterion), _rows(root, block.k, criterion),  # type: ignore[arg-type]
            _rows(root, block.v, criterion))  # type: ignore[arg-type]


def _head_scores(root: nn.Module, block: TransformerBlock, criterion: ElementCriterion
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per query head, score per KV head): projection rows plus output columns."""
    d = block.head_dim
    q, k, v = _qkv_scores(root, block, criterion)
    out = _cols(root, block.attention_out, criterion)  # type: ignore[arg-type]
    query = q.reshape(block.heads, d).sum(1) + out.reshape(block.heads, d).sum(1)
    kv = k.reshape(block.kv_heads, d).sum(1) + v.reshape(block.kv_heads, d).sum(1)
    return query, kv


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` lowest scores (ties: the later index goes first, as before)."""
    keep = torch.sort(scores, descending=True, stable=True).indices[: len(scores) - n]
    return sorted(set(range(len(scores))) - {int(i) for i in keep})


# ------------------------------------------------------------------------------------------ heads


def plan_heads(block: TransformerBlock, n_remove: int, query: torch.Tensor, kv: torch.Tensor
               ) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) after removing ``n_remove`` query heads of ``block``.

    Multi-head attention: the lowest-scoring heads. Grouped-query attention: ``n_remove / kv_heads``
    query heads from every KV group when that divides, else ``n_remove / G`` whole KV groups, else
    ``RecipeError`` naming the valid counts.
    """
    heads, kv_heads = block.heads, block.kv_heads
    if not 0 <= n_remove < heads:
        raise RecipeError(f"cannot remove {n_remove} of the {heads} heads of {block.layer}: keep at least one")
    if kv_heads == heads:
        kept = sorted(set(range(heads)) - set(_lowest(query, n_remove)))
        return kept, kept
    group = heads // kv_heads
    if n_remove % kv_heads == 0:
        per_group = n_remove // kv_heads
        kept = []
        for g in range(kv_heads):
            members = list(range(g * group, (g + 1) * group))
            drop = {members[i] for i in _lowest(query[members], per_group)}
            kept += [h for h in members if h not in drop]
        return kept, list(range(kv_heads))
    if n_remove % group == 0:
        scores = kv + query.reshape(kv_heads, group).sum(1)
        kept_groups = sorted(set(range(kv_heads)) - set(_lowest(scores, n_remove // group)))
        return [g * group + j for g in kept_groups for j in range(group)], kept_groups
    valid = sorted({kv_heads * i for i in range(1, group)} | {group * i for i in range(1, kv_heads)})
    raise RecipeError(f"{block.layer} has grouped-query attention ({heads} query heads in {kv_heads} KV groups): "
                      f"remove a number of heads that keeps the groups even ({', '.join(map(str, valid))})")


def prune_heads_(root: nn.Module, block: TransformerBlock, n_remove: int,
                 criterion: ElementCriterion = magnitude_l2) -> list[int]:
    """Remove ``n_remove`` attention heads of ``block`` (GQA-aware, see :func:`plan_heads`).

    Returns the kept query-head indices (original numbering). Raises ``UnsupportedLayerError`` for a
    block without recognised attention projections and ``RecipeError`` for an impossible count.
    """
    if block.attention is None or block.attention_out is None:
        raise UnsupportedLayerError(f"{block.layer} has no query/key/value attention with an output projection")
    query, kv = _head_scores(root, block, criterion)
    kept, kept_kv = plan_heads(block, n_remove, query, kv)
    if n_remove == 0:
        return kept
    d = block.head_dim
    q_rows = [h * d + j for h in kept for j in range(d)]
    kv_rows = [g * d + j for g in kept_kv for j in range(d)]
    if block.qkv is not None:
        width = block.heads * d
        cut_(root, block.qkv, "out", q_rows + [width + r for r in kv_rows] + [2 * width + r for r in kv_rows])
    else:
        cut_(root, block.q, "out", q_rows)  # type: ignore[arg-type]
        if len(kept_kv) < block.kv_heads:
            cut_(root, block.k, "out", kv_rows)  # type: ignore[arg-type]
            cut_(root, block.v, "out", kv_rows)  # type: ignore[arg-type]
    cut_(root, block.attention_out, "in", q_rows)
    block.heads, block.kv_heads = len(kept), len(kept_kv)
    _set_heads(get_submodule(root, block.attention), block.heads, block.kv_heads, d)
    record_transform(root, "attention_heads", block.attention, heads=block.heads, kv_heads=block.kv_heads,
                     head_dim=d)
    return kept


def _set_heads(attn: nn.Module, heads: int, kv_heads: int | None = None, head_dim: int | None = None) -> None:
    """Update every head-count attribute the families' attention modules keep."""
    size = head_dim or getattr(attn, "attention_head_size", None) or getattr(attn, "head_dim", None)
    if hasattr(attn, "num_attention_heads"):
        attn.num_attention_heads = heads
    if hasattr(attn, "all_head_size") and size:
        attn.all_head_size = heads * size
    if hasattr(attn, "n_heads"):
        attn.n_heads = heads
    if hasattr(attn, "num_heads"):
        attn.num_heads = heads
    if hasattr(attn, "split_size") and size:  # GPT-2: c_attn output split into q, k, v
        attn.split_size = heads * size
    if hasattr(attn, "num_key_value_groups") and kv_heads:
        attn.num_key_value_groups = heads // kv_heads
    if hasattr(attn, "num_key_value_heads") and kv_heads:
        attn.num_key_value_heads = kv_heads


class HeadsParams(TransformParams):
    heads: Size
    kv_heads: Size | None = None
    head_dim: Size | None = None


@register_transform("attention_heads", params=HeadsParams)
def _replay_heads(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    try:
        kv = params.get("kv_heads")
        dim = params.get("head_dim")
        _set_heads(get_submodule(root, target), int(params["heads"]), int(kv) if kv is not None else None,
                   int(dim) if dim is not None else None)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot replay head pruning of {target!r}: {exc}") from None


# ------------------------------------------------------------------------------------------ FFN


def prune_ffn_(root: nn.Module, block: TransformerBlock, ratio: float,
               criterion: ElementCriterion = magnitude_l2) -> list[int]:
    """Remove ``ratio`` of the FFN neurons of ``block`` (outputs of the FFN input and gate projections,
    inputs of the output projection); returns the kept neuron indices."""
    if block.ffn_in is None or block.ffn_out is None:
        raise UnsupportedLayerError(f"{block.layer} has no FFN input/output projection pair")
    n = _out_features(get_submodule(root, block.ffn_in))
    keep = n - int(round(ratio * n))
    scores = _rows(root, block.ffn_in, criterion) + _cols(root, block.ffn_out, criterion)
    if block.ffn_gate is not None:
        scores = scores + _rows(root, block.ffn_gate, criterion)
    kept = sorted(int(i) for i in torch.sort(scores, descending=True, stable=True).indices[:keep])
    if keep < n:
        cut_(root, block.ffn_in, "out", kept)
        if block.ffn_gate is not None:
            cut_(root, block.ffn_gate, "out", kept)
        cut_(root, block.ffn_out, "in", kept)
    return kept


@torch.no_grad()
def mask_pruned_(root: nn.Module, block: TransformerBlock, kept_heads: list[int] | None,
                 kept_neurons: list[int] | None) -> None:
    """The masked reference: zero, in an unpruned copy, the output-projection inputs of every head and
    FFN neuron not kept. Its outputs equal the pruned model's up to float rounding (a test checks it)."""
    d = block.head_dim
    if kept_heads is not None and block.attention_out is not None:
        out = get_submodule(root, block.attention_out)
        drop = [h * d + j for h in range(block.heads) if h not in set(kept_heads) for j in range(d)]
        if _is_conv1d(out):
            out.weight[drop, :] = 0
        else:
            out.weight[:, drop] = 0
    if kept_neurons is not None and block.ffn_out is not None:
        out = get_submodule(root, block.ffn_out)
        drop = sorted(set(range(out.weight.shape[0 if _is_conv1d(out) else 1])) - set(kept_neurons))
        if _is_conv1d(out):
            out.weight[drop, :] = 0
        else:
            out.weight[:, drop] = 0


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
    for position, block in enumerate(kept):  # a KV cache holds one slot per block, indexed by layer_idx
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = position
    grand, _, attr = parent.rpartition(".")
    setattr(get_submodule(root, grand), attr, kept)
    owner_config = getattr(get_submodule(root, grand), "config", None)
    if owner_config is not None and hasattr(owner_config, "num_hidden_layers"):
        types = getattr(owner_config, "layer_types", None)
        if isinstance(types, list) and len(types) == owner_config.num_hidden_layers:
            owner_config.layer_types = [types[i] for i in keep]  # Qwen2 indexes it by position
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

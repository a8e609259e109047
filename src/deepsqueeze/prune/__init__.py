"""Pruning: unstructured / N:M weight pruning with schedules, structured pruning that physically
shrinks the model, sensitivity analysis, and sparse execution + storage.

``prune_(model, config)`` is the one in-place verb; the mask helpers let other techniques (Deep
Compression) keep pruned weights at zero in their own fine-tuning.
"""

from __future__ import annotations

from torch import nn

from deepsqueeze.core.context import StageContext
from deepsqueeze.core.model import Model
from deepsqueeze.prune import schedules
from deepsqueeze.prune.config import (
    ChannelSchedule,
    ChannelScope,
    Execution,
    OneShotMethod,
    Pattern,
    PruneChannelsConfig,
    PruneConfig,
    PruneOneShotConfig,
    PruneTransformerConfig,
    Schedule,
    Scope,
    Storage,
)
from deepsqueeze.prune.graph import DependencyGraph, Group, analyze
from deepsqueeze.prune.importance import (
    Criterion,
    bn_scale,
    element_criterion,
    magnitude_l1,
    magnitude_l2,
    random_scores,
    taylor,
)
from deepsqueeze.prune.oneshot import magnitude_mask, prune_oneshot_, sparsegpt_prune, wanda_mask
from deepsqueeze.prune.sparse import to_sparse_execution
from deepsqueeze.prune.stage import as_model
from deepsqueeze.prune.structured import ChannelPlan, ChannelPruneResult, group_scores, prune_channels_
from deepsqueeze.prune.surgery import cut_, register_surgery
from deepsqueeze.prune.transformer import (
    TransformerBlock,
    drop_layers_,
    find_blocks,
    mask_pruned_,
    plan_heads,
    prune_ffn_,
    prune_heads_,
)
from deepsqueeze.prune.unstructured import (
    MaskSet,
    UnstructuredPlan,
    compute_masks,
    enforce_masks,
    layer_sparsities,
    masks_from_zeros,
    prunable_weights,
    prune_weights_,
)
from deepsqueeze.runtime import CSR_BREAK_EVEN_SPARSITY, SparseCSRLinear


def prune_(model: Model | nn.Module, config: PruneConfig, ctx: StageContext | None = None) -> Model:
    """Apply a pruning config in place (fine-tuning needs ``ctx.data``); return the ``Model`` handle."""
    from deepsqueeze.core.config import stage_entry

    handle = as_model(model)
    _, handler = stage_entry(config.stage_type)
    handler(handle, config, ctx if ctx is not None else StageContext(handle, progress=False))
    return handle


__all__ = [
    "OneShotMethod",
    "PruneOneShotConfig",
    "magnitude_mask",
    "prune_oneshot_",
    "sparsegpt_prune",
    "wanda_mask",
    "CSR_BREAK_EVEN_SPARSITY",
    "ChannelPlan",
    "ChannelPruneResult",
    "ChannelSchedule",
    "ChannelScope",
    "Criterion",
    "DependencyGraph",
    "Execution",
    "Group",
    "MaskSet",
    "Pattern",
    "PruneChannelsConfig",
    "PruneConfig",
    "PruneTransformerConfig",
    "Schedule",
    "Scope",
    "SparseCSRLinear",
    "Storage",
    "TransformerBlock",
    "UnstructuredPlan",
    "analyze",
    "bn_scale",
    "compute_masks",
    "cut_",
    "drop_layers_",
    "element_criterion",
    "enforce_masks",
    "find_blocks",
    "group_scores",
    "layer_sparsities",
    "magnitude_l1",
    "magnitude_l2",
    "masks_from_zeros",
    "prunable_weights",
    "prune_",
    "prune_channels_",
    "prune_ffn_",
    "prune_heads_",
    "mask_pruned_",
    "plan_heads",
    "prune_weights_",
    "random_scores",
    "register_surgery",
    "schedules",
    "taylor",
    "to_sparse_execution",
]

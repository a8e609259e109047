"""The ``prune`` stage driver: schedules, fine-tuning with enforced masks, sparse storage and execution."""

from __future__ import annotations

import glob
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.config import register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.coverage import register_planner, report_coverage, snapshot
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import (
    BLOCKED,
    EXCLUDED,
    UNSUPPORTED,
    CoverageEntry,
    get_record,
    record_coverage,
    record_encoding,
)
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError, ModelError, RecipeError, UnsupportedLayerError
from deepsqueeze.primitives.masks import sparsity_of
from deepsqueeze.prune import schedules
from deepsqueeze.prune.config import (
    ChannelSchedule,
    ChannelScope,
    Execution,
    Pattern,
    PruneChannelsConfig,
    PruneConfig,
    PruneTransformerConfig,
    Schedule,
    Scope,
    Storage,
    _FinetuneFields,
)
from deepsqueeze.prune.graph import analyze
from deepsqueeze.prune.importance import Criterion, accumulate_gradients, element_criterion
from deepsqueeze.prune.sparse import to_sparse_execution
from deepsqueeze.prune.structured import ChannelPlan, prune_channels_
from deepsqueeze.prune.unstructured import (
    MaskSet,
    UnstructuredPlan,
    compute_masks,
    prunable_weights,
    prune_coverage,
)
from deepsqueeze.runtime import CSR_BREAK_EVEN_SPARSITY

Hook = Callable[[int, int], None]

# A weight this sparse or more is stored with the ``sparse`` encoding (bitmap overhead is 1/32 of fp32).
SPARSE_STORAGE_MIN_SPARSITY = 0.1


def as_model(model: Model | nn.Module) -> Model:
    """Wrap a bare module so the stage handlers can take it (no fine-tuning data, classifier task)."""
    if isinstance(model, Model):
        return model
    return Model(model, {"kind": "module"}, Task.CLASSIFIER, type(model).__name__, count_params(model))


def finetune(model: Model, ctx: StageContext, config: _FinetuneFields, epochs: float,
             before_step: Hook | None = None, after_step: Hook | None = None, description: str = "") -> float:
    """Fine-tune through ``deepsqueeze.train`` (labels for classifiers, embedding matching for encoders)."""
    if epochs <= 0:
        return float("nan")
    from deepsqueeze.train import finetune_model

    stats = finetune_model(model, ctx, batch_size=config.batch_size, limit=config.limit,
                           what=f"{description or 'pruning'} with {epochs} fine-tuning epochs (or set epochs: 0)",
                           epochs=epochs, lr=config.lr, optimizer=config.optimizer.value,
                           schedule=config.lr_schedule.value, before_step=before_step, after_step=after_step)
    return float(stats["loss"])


def loss_closures(model: Model, ctx: StageContext, batches: int, batch_size: int) -> list[Callable[[], torch.Tensor]]:
    """Closures computing the training loss on the first ``batches`` training batches (for gradients)."""
    if not isinstance(ctx.data, ClassificationData):
        raise DataError("gradient-based importance (taylor) needs labelled image data: pass --data, "
                        "or use criterion l1/l2 for sentence encoders")
    out = []
    for x, y in ctx.data.batches("train", batch_size, shuffle=True, seed=ctx.seed, limit=batches * batch_size):
        x, y = x.to(ctx.device), y.to(ctx.device)
        out.append(lambda x=x, y=y: nn.functional.cross_entropy(model.module(x), y))
    return out


def _plan(config: PruneConfig) -> UnstructuredPlan:
    nm = None
    if config.pattern is not Pattern.UNSTRUCTURED:
        n, m = config.pattern.value.split(":")
        nm = (int(n), int(m))
    return UnstructuredPlan(config.sparsity, config.threshold, nm, config.scope is Scope.GLOBAL,
                            dict(config.overrides))


def _steps_per_epoch(model: Model, ctx: StageContext, config: _FinetuneFields) -> int:
    if isinstance(ctx.data, ClassificationData):
        n = len(ctx.data.train_x) if config.limit is None else min(config.limit, len(ctx.data.train_x))
    elif isinstance(ctx.data, TextData):
        n = len(ctx.data.sentences) if config.limit is None else min(config.limit, len(ctx.data.sentences))
    else:
        return 1
    return max(1, -(-n // config.batch_size))


class _Pruner:
    """Holds the layers, plan and current masks of one ``prune`` stage."""

    def __init__(self, model: Model, config: PruneConfig, ctx: StageContext) -> None:
        self.model, self.config, self.ctx = model, config, ctx
        self.params = prunable_weights(model.module, config.include, config.exclude)
        if not self.params:
            raise RecipeError("no Linear/Conv layers match the include/exclude patterns: nothing to prune")
        self.plan = _plan(config)
        self.criterion = element_criterion(config.criterion, ctx.seed)
        if config.scope is Scope.SENSITIVITY and config.threshold is None and config.pattern is Pattern.UNSTRUCTURED:
            self.plan.overrides.update(_sensitivity_allocation(model, config, ctx, self.params, self.plan))
        self.masks = MaskSet(model.module, {})
        self.events = 0

    def prune_to(self, fraction: float) -> None:
        grads = None
        if self.config.criterion is Criterion.TAYLOR:
            grads = accumulate_gradients(self.model.module, loss_closures(
                self.model, self.ctx, self.config.taylor_batches, self.config.batch_size))
        self.masks.masks = compute_masks(self.params, self.plan, self.criterion, fraction, grads,
                                         previous=self.masks.masks or None)
        self.masks.apply()
        self.events += 1


@register_planner("prune")
def plan_prune(module: nn.Module, config: PruneConfig, example: object = None) -> list[CoverageEntry]:
    """The coverage a ``prune`` stage will record (nothing runs)."""
    what = f"mask {config.pattern.value}" if config.pattern is not Pattern.UNSTRUCTURED else \
        f"mask {round(100 * config.sparsity)}%"
    return prune_coverage(module, prunable_weights(module, config.include, config.exclude), what, config.include,
                          config.exclude)


@register_stage(PruneConfig)
def prune_stage(model: Model, config: PruneConfig, ctx: StageContext) -> None:
    """Apply a ``prune`` stage: schedule + fine-tuning, then sparse storage / execution."""
    start = time.perf_counter()
    pruner = _Pruner(model, config, ctx)
    final = config.sparsity
    loss = float("nan")
    if config.schedule is Schedule.ONE_SHOT:
        pruner.prune_to(1.0)
        loss = finetune(model, ctx, config, config.epochs, after_step=pruner.masks.after_step, description="prune")
    elif config.schedule is Schedule.ITERATIVE:
        schedule = schedules.iterative(final, config.rounds)
        for r in range(config.rounds):
            pruner.prune_to(_fraction(schedule(r, config.rounds), final))
            loss = finetune(model, ctx, config, config.epochs / config.rounds, after_step=pruner.masks.after_step,
                            description="iterative pruning")
    elif config.schedule is Schedule.AGP:
        total = max(1, round(config.epochs * _steps_per_epoch(model, ctx, config)))
        frequency = config.agp_frequency or max(1, int(total * (config.agp_end - config.agp_start)) // 40)
        schedule = schedules.agp(final, 0.0, config.agp_start, config.agp_end, frequency)
        current = {"sparsity": -1.0}

        def before_step(step: int, steps: int) -> None:
            target = schedule(step, steps)
            if target > current["sparsity"]:
                current["sparsity"] = target
                pruner.prune_to(_fraction(target, final))

        loss = finetune(model, ctx, config, config.epochs, before_step=before_step,
                        after_step=pruner.masks.after_step, description="AGP pruning")
        pruner.prune_to(1.0)  # make sure the final target holds even if training stopped early
    else:
        loss = _lottery(model, config, ctx, pruner)
    seconds = time.perf_counter() - start
    what = f"mask {config.pattern.value}" if config.pattern is not Pattern.UNSTRUCTURED else \
        f"mask {round(100 * pruner.masks.overall_sparsity())}%"
    entries = prune_coverage(model.module, pruner.params, what, config.include, config.exclude)
    _finish(model, config, pruner.masks)
    record_coverage(model.module, entries)
    report_coverage(entries, ctx.on_unsupported)
    ctx.report.append({
        "stage": "prune", "schedule": config.schedule.value, "sparsity": round(pruner.masks.overall_sparsity(), 4),
        "layers": {name: round(s, 4) for name, s in pruner.masks.sparsity().items()},
        "prune_events": pruner.events, "train_loss": None if loss != loss else round(loss, 5),
        "seconds": round(seconds, 2),
    })


SCAN_SAMPLES = 1024
SCAN_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def _sensitivity_allocation(model: Model, config: PruneConfig, ctx: StageContext, params: dict[str, nn.Parameter],
                            plan: UnstructuredPlan) -> dict[str, float]:
    """Per-layer sparsities (exact layer names) reaching ``config.sparsity`` over the layers it applies to, from
    a scan of each layer pruned alone (``prune.sensitivity``); the metric is accuracy on the last
    ``SCAN_SAMPLES`` training samples, or cosine to the reference on up to 64 calibration sentences."""
    from deepsqueeze.prune.sensitivity import allocate_sparsity_greedy, sensitivity_scan

    free = [name.removesuffix(".weight") for name in params if name.endswith(".weight") and plan.layer_target(name) is None]
    if not free:
        return {}
    was_training = model.module.training
    model.module.eval()
    try:
        metric = scan_metric(model, ctx)
        curves = sensitivity_scan(model.module, metric, SCAN_SPARSITIES, self_criterion(config, ctx), include=free)
    finally:
        model.module.train(was_training)
    sizes = {name: params[f"{name}.weight"].numel() for name in curves}
    return {glob.escape(name): s for name, s in allocate_sparsity_greedy(curves, sizes, config.sparsity).items()}


def scan_metric(model: Model, ctx: StageContext) -> Callable[[nn.Module], float]:
    """What a sensitivity scan scores a module by: accuracy on the last ``SCAN_SAMPLES`` training samples (the
    cosine of all outputs to the reference's for a model without class logits), or cosine to the reference on
    up to 64 calibration sentences. The model (and the reference) must be in eval mode. Raises DataError
    without such data."""
    from deepsqueeze.core.outputs import class_logits, flat_outputs

    data = ctx.data
    if isinstance(data, ClassificationData):
        x, y = data.train_x[-SCAN_SAMPLES:].to(ctx.device), data.train_y[-SCAN_SAMPLES:].to(ctx.device)
        with torch.no_grad():
            reference = (ctx.reference or model).module(x)
        if class_logits(reference, data.num_classes) is not None:
            return lambda module: float((class_logits(module(x)).argmax(-1) == y).float().mean())
        target = flat_outputs(reference)
        return lambda module: float(torch.nn.functional.cosine_similarity(flat_outputs(module(x)), target,
                                                                          dim=-1).mean())
    if isinstance(data, TextData) and ctx.reference is not None and hasattr(model.module, "encode"):
        sentences = list(data.sentences[:64])
        target = ctx.reference.module.encode(sentences).float()  # type: ignore[operator]

        def cosine(module: nn.Module) -> float:
            emb = module.encode(sentences).float()  # type: ignore[operator]
            return float(torch.nn.functional.cosine_similarity(emb, target, dim=-1).mean())
        return cosine
    raise DataError("scope: sensitivity measures each layer on held-out samples: pass --data")


def self_criterion(config: PruneConfig, ctx: StageContext) -> Any:
    """The element criterion the scan ranks with: the stage's own, except gradient-based ones (magnitude)."""
    if config.criterion is Criterion.TAYLOR:
        return element_criterion(Criterion.L1, ctx.seed)
    return element_criterion(config.criterion, ctx.seed)


def _fraction(sparsity: float, final: float) -> float:
    return 1.0 if final <= 0 else min(1.0, sparsity / final)


def _lottery(model: Model, config: PruneConfig, ctx: StageContext, pruner: _Pruner) -> float:
    """Iterative magnitude pruning with rewinding: train dense, snapshot early weights, then per round
    prune, rewind the survivors to the snapshot and retrain (Frankle et al., with late rewinding)."""
    phase_epochs = config.epochs / (config.rounds + 1)
    total = max(1, round(phase_epochs * _steps_per_epoch(model, ctx, config)))
    rewind_step = int(config.rewind * total)
    snapshot: dict[str, torch.Tensor] = {}

    def take(step: int) -> None:
        if not snapshot:
            snapshot.update({k: v.detach().clone() for k, v in model.module.state_dict().items()})

    if rewind_step == 0:
        take(0)
    loss = finetune(model, ctx, config, phase_epochs,
                    after_step=lambda step, steps: take(step) if step >= rewind_step else None,
                    description="lottery: dense phase")
    take(0)
    schedule = schedules.iterative(config.sparsity, config.rounds)
    for r in range(config.rounds):
        pruner.prune_to(_fraction(schedule(r, config.rounds), config.sparsity))
        model.module.load_state_dict(snapshot)
        pruner.masks.apply()
        loss = finetune(model, ctx, config, phase_epochs, after_step=pruner.masks.after_step,
                        description=f"lottery: round {r + 1}")
    return loss


def _finish(model: Model, config: PruneConfig, masks: MaskSet) -> None:
    """Record sparse storage for sparse weights and swap in sparse execution where configured."""
    module = model.module
    if config.execution is not Execution.DENSE:
        minimum = CSR_BREAK_EVEN_SPARSITY if config.execution is Execution.AUTO else 1e-9
        names = [name.rsplit(".", 1)[0] for name in masks.masks]
        to_sparse_execution(module, minimum, include=names)
    if config.storage is Storage.SPARSE:
        state = module.state_dict()
        for name in masks.masks:
            if name in state and sparsity_of(state[name]) >= SPARSE_STORAGE_MIN_SPARSITY:
                record_encoding(module, name, "sparse")


def example_input(model: Model) -> torch.Tensor:
    """A fixed random batch of one input of ``model`` (structured pruning traces shapes with it)."""
    if model.input_shape is None:
        raise ModelError(f"{model.ref} has no known input shape: structured pruning traces the model with an "
                         "example input; pass --data with the images it takes (e.g. fashion-mnist), or give "
                         "the module an input_shape attribute such as (1, 28, 28)")
    generator = torch.Generator().manual_seed(0)
    return torch.randn((1, *model.input_shape), generator=generator)


def _channel_plan(config: PruneChannelsConfig) -> ChannelPlan:
    return ChannelPlan(config.ratio, dict(config.overrides), config.include, list(config.exclude), config.round_to,
                       config.min_channels)


def channel_coverage(module: nn.Module, example: torch.Tensor, plan: ChannelPlan) -> list[CoverageEntry]:
    """Per weight-bearing module: whose output channels the plan cuts, which groups the dependency graph
    blocks (with the reason), and which kinds structured pruning does not know (one traced batch)."""
    graph = analyze(module, example)
    stage = len(get_record(module).stages)
    entries = []
    for snap in snapshot(module):
        kind = snap.kind or f"other:{type(snap.module).__name__}"
        role = graph.layers.get(snap.name)
        group = graph.groups.get(role.out_group) if role is not None and role.out_group is not None else None
        if group is None:
            entries.append(CoverageEntry(stage, "prune_channels", snap.name, kind, snap.weights, "float", None,
                                         UNSUPPORTED))
        elif group.blocked:
            entries.append(CoverageEntry(stage, "prune_channels", snap.name, kind, snap.weights, "skipped", None,
                                         f"{BLOCKED}: {'; '.join(group.blocked[:2])}"))
        elif (ratio := plan.ratio_for(group)) is None or ratio <= 0:
            entries.append(CoverageEntry(stage, "prune_channels", snap.name, kind, snap.weights, "skipped", None,
                                         EXCLUDED))
        else:
            entries.append(CoverageEntry(stage, "prune_channels", snap.name, kind, snap.weights, "compressed",
                                         f"channels -{round(100 * ratio)}%", None))
    return entries


@register_planner("prune_channels")
def plan_prune_channels(module: nn.Module, config: PruneChannelsConfig,
                        example: torch.Tensor | None = None) -> list[CoverageEntry]:
    """The coverage a ``prune_channels`` stage will record: graph analysis on one example batch."""
    if example is None:
        raise ModelError("prune_channels traces the model on an example input: it takes models with an input "
                         "shape (CNNs, MLPs: give a py: model --data or an input_shape attribute); for "
                         "transformers use prune_transformer (prune-transformer)")
    return channel_coverage(module, example, _channel_plan(config))


@register_stage(PruneChannelsConfig)
def prune_channels_stage(model: Model, config: PruneChannelsConfig, ctx: StageContext) -> None:
    """Remove channels/neurons (one-shot or in rounds), fine-tuning after each cut."""
    if model.task is not Task.CLASSIFIER:
        raise RecipeError("prune_channels traces CNN/MLP classifiers; for transformer encoders use the "
                          "prune_transformer stage (heads and FFN neurons)")
    start = time.perf_counter()
    example = example_input(model).to(ctx.device)
    full = _channel_plan(config)
    if config.scope is ChannelScope.SENSITIVITY:
        full.overrides.update(_channel_allocation(model, config, ctx, example, full))
    rounds = config.rounds if config.schedule is ChannelSchedule.ITERATIVE else 1
    ratio = 1.0 - (1.0 - config.ratio) ** (1.0 / rounds)
    overrides = {k: 1.0 - (1.0 - v) ** (1.0 / rounds) for k, v in full.overrides.items()}
    plan = ChannelPlan(ratio, overrides, config.include, list(config.exclude), config.round_to, config.min_channels)
    entries = channel_coverage(model.module, example, full)
    params_before = count_params(model.module)
    criterion_seconds, loss = 0.0, float("nan")
    for r in range(rounds):
        t0 = time.perf_counter()
        grads = None
        if config.criterion is Criterion.TAYLOR:
            grads = accumulate_gradients(model.module, loss_closures(model, ctx, config.taylor_batches,
                                                                     config.batch_size))
        criterion = config.criterion if config.criterion is not Criterion.RANDOM else element_criterion(
            Criterion.RANDOM, ctx.seed + r)
        prune_channels_(model.module, example, plan, criterion, grads)
        criterion_seconds += time.perf_counter() - t0
        loss = finetune(model, ctx, config, config.epochs / rounds, description=f"channel pruning round {r + 1}")
    record_coverage(model.module, entries)
    report_coverage(entries, ctx.on_unsupported)
    ctx.report.append({
        "stage": "prune_channels", "ratio": config.ratio, "scope": config.scope.value,
        **({"ratios": dict(full.overrides)} if config.scope is ChannelScope.SENSITIVITY else {}),
        "rounds": rounds, "params_before": params_before,
        "params_after": count_params(model.module), "train_loss": None if loss != loss else round(loss, 5),
        "prune_seconds": round(criterion_seconds, 3), "seconds": round(time.perf_counter() - start, 2),
    })


def _channel_allocation(model: Model, config: PruneChannelsConfig, ctx: StageContext, example: torch.Tensor,
                        plan: ChannelPlan) -> dict[str, float]:
    """Per-group ratios from a scan (``prune.sensitivity.allocate_channels``) scored by :func:`scan_metric`;
    gradient criteria scan by L2 magnitude."""
    from deepsqueeze.prune.sensitivity import allocate_channels

    criterion: Any = Criterion.L2 if config.criterion is Criterion.TAYLOR else config.criterion
    if criterion is Criterion.RANDOM:
        criterion = element_criterion(Criterion.RANDOM, ctx.seed)
    was_training = model.module.training
    model.module.eval()
    try:
        return allocate_channels(model.module, example, plan, scan_metric(model, ctx), criterion)
    finally:
        model.module.train(was_training)


def heads_to_remove(root: nn.Module, block: Any, heads: float) -> int:
    """``heads`` as a count for ``block``: a count stays, a fraction below 1 scales the block's head count."""
    if heads >= 1 or heads == 0:
        return int(heads)
    attention = root.get_submodule(block.attention) if block.attention else None
    total = int(getattr(attention, "num_attention_heads", 0))
    return int(round(heads * total))


@register_stage(PruneTransformerConfig)
def prune_transformer_stage(model: Model, config: PruneTransformerConfig, ctx: StageContext) -> None:
    """Remove heads / FFN neurons / whole blocks of a transformer (encoders and decoders), then fine-tune."""
    import fnmatch

    from deepsqueeze.prune.blocks import block_influence, least_influential
    from deepsqueeze.prune.transformer import drop_layers_, find_blocks, prune_ffn_, prune_heads_

    start = time.perf_counter()
    root = model.module
    params_before = count_params(root)
    dropped, influence = list(config.drop_layers), None
    if config.drop_blocks:
        influence = block_influence(model, ctx.data, config.calibration_samples)
        dropped += least_influential(influence, config.blocks_to_drop(len(influence)), dropped)
    if dropped:
        drop_layers_(root, dropped)
    blocks = [b for b in find_blocks(root)
              if config.include is None or any(fnmatch.fnmatchcase(b.layer, p) for p in config.include)]
    if not blocks and (config.heads or config.ffn_ratio):
        raise UnsupportedLayerError(f"{model.ref} has no transformer blocks deepsqueeze recognises (BERT, ALBERT, "
                                    "DistilBERT, GPT-2 or Llama-style attention with an FFN) matching the include "
                                    "patterns")
    criterion = element_criterion(config.criterion)
    heads: dict[str, int] = {}
    for block in blocks:
        if config.heads:
            heads[block.layer] = len(prune_heads_(root, block, heads_to_remove(root, block, config.heads), criterion))
        if config.ffn_ratio:
            prune_ffn_(root, block, config.ffn_ratio, criterion)
    prune_s = time.perf_counter() - start
    loss = finetune(model, ctx, config, config.epochs, description="transformer pruning")
    ctx.report.append({
        "stage": "prune_transformer", "blocks": len(blocks), "heads_kept": heads, "ffn_ratio": config.ffn_ratio,
        "dropped": dropped, **({"block_influence": {k: round(v, 5) for k, v in influence.items()}} if influence else {}),
        "params_before": params_before, "params_after": count_params(root),
        "train_loss": None if loss != loss else round(loss, 5), "prune_seconds": round(prune_s, 3),
        "seconds": round(time.perf_counter() - start, 2),
    })

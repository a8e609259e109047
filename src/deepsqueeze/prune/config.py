"""Typed configs of the pruning stages (recipe form: ``{"type": "prune", ...}``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from deepsqueeze.core.config import (
    MAX_COUNT,
    Count,
    Epochs,
    Fraction,
    Index,
    LearningRate,
    StageConfig,
    Weight,
)
from deepsqueeze.prune.importance import Criterion


class Scope(StrEnum):
    LAYER = "layer"    # every layer pruned to the same sparsity
    GLOBAL = "global"  # one ranking across all layers
    SENSITIVITY = "sensitivity"  # per-layer sparsities from a measured scan, most sensitive pruned least


class Pattern(StrEnum):
    UNSTRUCTURED = "unstructured"
    NM_2_4 = "2:4"
    NM_4_8 = "4:8"


class Schedule(StrEnum):
    ONE_SHOT = "one_shot"    # prune, then fine-tune with masks enforced
    ITERATIVE = "iterative"  # prune, fine-tune, repeat (rounds)
    AGP = "agp"              # Zhu & Gupta's cubic schedule over the fine-tuning steps
    LOTTERY = "lottery"      # iterative magnitude pruning with rewinding to early weights


class Execution(StrEnum):
    DENSE = "dense"            # keep nn.Linear (zeros multiplied densely)
    AUTO = "auto"              # SparseCSRLinear where sparsity passes the measured break-even
    SPARSE_CSR = "sparse_csr"  # SparseCSRLinear for every pruned Linear


class Storage(StrEnum):
    SPARSE = "sparse"  # values + compact indices in the artifact
    DENSE = "dense"    # raw dense tensors


class TrainOptimizer(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class LRSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    ONECYCLE = "onecycle"


class _FinetuneFields(StageConfig):
    """Fine-tuning options shared by the pruning stages (``epochs: 0`` = no fine-tuning)."""

    epochs: Epochs = 0.0
    lr: LearningRate = 1e-4
    batch_size: Count = 128
    optimizer: TrainOptimizer = TrainOptimizer.ADAM
    lr_schedule: LRSchedule = LRSchedule.COSINE
    limit: Count | None = Field(None, description="use at most this many training samples per epoch")


class PruneConfig(_FinetuneFields):
    """Weight pruning of Linear/Conv layers: unstructured (ratio or |w| < threshold) or N:M.

    ``overrides`` maps fnmatch patterns on layer names to their own sparsity (e.g. ``{"4": 0.7}``);
    layers not overridden share ``sparsity`` (per layer, or one global ranking with ``scope: global``), or, with
    ``scope: sensitivity``, get per-layer sparsities reaching ``sparsity`` overall from a sensitivity scan on
    held-out training samples (each layer pruned alone; the layers whose pruning hurts most keep most).
    """

    stage_type = "prune"

    sparsity: Fraction = 0.5
    threshold: Weight | None = Field(None, description="prune |w| < threshold instead of a ratio")
    pattern: Pattern = Pattern.UNSTRUCTURED
    criterion: Criterion = Criterion.L1
    scope: Scope = Scope.LAYER
    overrides: dict[str, Fraction] = Field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    schedule: Schedule = Schedule.ONE_SHOT
    rounds: Count = Field(3, description="pruning rounds of the iterative and lottery schedules")
    agp_start: Fraction = Field(0.0, lt=1, description="AGP starts at this fraction of fine-tuning steps")
    agp_end: Fraction = Field(0.75, gt=0, description="AGP reaches the target at this fraction")
    agp_frequency: Index = Field(0, description="steps between AGP updates (0: about 40 updates)")
    rewind: Fraction = Field(0.1, lt=1, description="lottery: snapshot at this fraction of the dense phase")
    taylor_batches: Count = 8
    storage: Storage = Storage.SPARSE
    execution: Execution = Execution.DENSE

    @model_validator(mode="after")
    def _check_combination(self) -> PruneConfig:
        if self.agp_start >= self.agp_end:
            raise ValueError(f"agp_start ({self.agp_start}) must be below agp_end ({self.agp_end})")
        if self.schedule in (Schedule.AGP, Schedule.LOTTERY) and self.epochs == 0:
            raise ValueError(f"schedule {self.schedule.value} prunes during fine-tuning: set epochs > 0")
        if self.pattern is not Pattern.UNSTRUCTURED and (self.threshold is not None or self.schedule
                                                          is not Schedule.ONE_SHOT):
            raise ValueError("N:M patterns are one-shot with a fixed ratio: drop threshold and use one_shot")
        if self.threshold is not None and self.schedule is not Schedule.ONE_SHOT:
            raise ValueError("threshold pruning is one-shot: use schedule one_shot or give a sparsity instead")
        if self.criterion is Criterion.BN_SCALE:
            raise ValueError("bn_scale scores channels: use it with the prune_channels stage")
        return self


class ChannelScope(StrEnum):
    UNIFORM = "uniform"          # every group loses ``ratio`` of its channels
    SENSITIVITY = "sensitivity"  # per-group ratios from a measured scan, no more multiply-adds than uniform


class ChannelSchedule(StrEnum):
    ONE_SHOT = "one_shot"    # cut everything, then fine-tune
    ITERATIVE = "iterative"  # cut a share, fine-tune, repeat (rounds)


class PruneChannelsConfig(_FinetuneFields):
    """Structured pruning that removes whole channels/neurons (the model becomes physically smaller).

    ``ratio`` of the channels of every prunable dependency group is removed (Conv2d outputs with their
    BatchNorm and consumers, Linear neurons, residual-coupled channels together); ``include``/``exclude``/
    ``overrides`` match the names of the layers producing a group. ``scope: sensitivity`` gives each group
    not overridden its own ratio from a scan on held-out training samples (each group pruned alone), so the
    model keeps at most the multiply-adds ``ratio`` everywhere would leave, the groups whose cut hurts most
    losing least.
    """

    stage_type = "prune_channels"

    ratio: Fraction = Field(0.5, lt=1)
    criterion: Criterion = Criterion.L2
    scope: ChannelScope = ChannelScope.UNIFORM
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    overrides: dict[str, Annotated[Fraction, Field(lt=1)]] = Field(default_factory=dict)
    round_to: Count = Field(1, description="keep a multiple of this many channels per group")
    min_channels: Count = 1
    schedule: ChannelSchedule = ChannelSchedule.ONE_SHOT
    rounds: Count = 2
    taylor_batches: Count = 8


class PruneTransformerConfig(_FinetuneFields):
    """Structured pruning of transformer blocks (BERT, RoBERTa, ALBERT, DistilBERT, GPT-2, Llama/Mistral/Qwen2
    with grouped-query attention): ``heads`` attention heads (GQA: evenly per KV group or whole groups) and
    ``ffn_ratio`` of the FFN neurons removed from every block matching ``include``, and whole blocks in
    ``drop_layers`` removed, and the ``drop_blocks`` blocks of lowest Block Influence on ``calibration_samples``
    sentences of the data (Men et al. 2024, ShortGPT: ``1 - cos`` of each block's input and output hidden
    states; :mod:`deepsqueeze.prune.blocks`).

    ``heads`` is a count (``2``: two heads per block) or a fraction below 1 (``0.25``: a quarter of each
    block's heads, rounded to the nearest count); ``ffn_ratio`` is a fraction of the FFN neurons.
    Heads and neurons are ranked by the L1/L2 magnitude of their weights (Michel et al. 2019,
    "Are Sixteen Heads Really Better than One?", for head removal).
    """

    stage_type = "prune_transformer"

    heads: Index | Annotated[float, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)] = Field(
        0, description="attention heads removed from every block: a count (2) or a fraction of each block's heads "
        "below 1 (0.25)")
    ffn_ratio: Fraction = Field(0.0, lt=1, description="fraction of FFN neurons removed from every block")
    drop_layers: list[str] = Field(default_factory=list, description="blocks removed, e.g. encoder.layer.5")
    drop_blocks: Index | Annotated[float, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)] = Field(
        0, description="more blocks removed, those whose output changes their input least on calibration sentences "
        "(Block Influence): a count (4) or a fraction of the blocks below 1 (0.125; at least one)")
    calibration_samples: Count = 32
    criterion: Criterion = Criterion.L2
    include: list[str] | None = None

    def needs_data(self) -> bool:  # noqa: D102 - fine-tuning, or measuring which blocks to remove
        return self.drop_blocks > 0 or super().needs_data()

    def blocks_to_drop(self, total: int) -> int:
        """``drop_blocks`` as a count for a model of ``total`` blocks (a fraction rounds, to at least one)."""
        if self.drop_blocks >= 1 or self.drop_blocks == 0:
            return int(self.drop_blocks)
        return max(1, int(self.drop_blocks * total + 0.5))

    @model_validator(mode="after")
    def _check_criterion(self) -> PruneTransformerConfig:
        if self.heads >= 1 and float(self.heads) != int(self.heads):
            raise ValueError(f"heads: {self.heads} is neither a count of heads (2) nor a fraction below 1 (0.25)")
        if self.drop_blocks >= 1 and float(self.drop_blocks) != int(self.drop_blocks):
            raise ValueError(f"drop_blocks: {self.drop_blocks} is neither a count of blocks (4) nor a fraction below "
                             "1 (0.125)")
        if self.criterion not in (Criterion.L1, Criterion.L2):
            raise ValueError("prune_transformer scores heads and neurons by weight magnitude: use l1 or l2")
        return self

    def preflight(self, model: Any) -> None:
        """The model has transformer blocks this stage recognises (matching ``include``); ``drop_blocks`` leaves
        at least one on a model that reads sentences."""
        import fnmatch

        from deepsqueeze.errors import RecipeError, UnsupportedLayerError
        from deepsqueeze.prune.transformer import find_blocks

        every = find_blocks(model.module)
        blocks = [b for b in every if self.include is None or any(fnmatch.fnmatchcase(b.layer, p) for p in self.include)]
        if self.drop_blocks and not model.task.is_text:
            raise UnsupportedLayerError(f"drop_blocks measures blocks on sentences; {model.ref} is a "
                                        f"{model.task.value}: name the blocks to remove in drop_layers")
        if self.drop_blocks and self.blocks_to_drop(len(every)) + len(self.drop_layers) >= len(every):
            raise RecipeError(f"drop_blocks {self.drop_blocks} and drop_layers {len(self.drop_layers)} would remove "
                              f"all {len(every)} blocks of {model.ref}: keep at least one")
        if not blocks and (self.heads or self.ffn_ratio):
            raise UnsupportedLayerError(
                f"{model.ref} has no transformer blocks deepsqueeze recognises (BERT, ALBERT, DistilBERT, GPT-2 or "
                "Llama-style attention with an FFN) matching the include patterns: prune_transformer is for "
                "transformers; use prune_channels (prune-structured) for CNNs")


class OneShotMethod(StrEnum):
    MAGNITUDE = "magnitude"  # |w|, ranked over the whole layer (the baseline of both papers)
    WANDA = "wanda"          # |w| * ||x_j||, ranked per output row (Sun et al., 2023)
    SPARSEGPT = "sparsegpt"  # OBS mask selection and weight update per block of columns (Frantar & Alistarh, 2023)


class PruneOneShotConfig(StageConfig):
    """One-shot pruning of the Linear layers of a large model from calibration data, without training.

    ``sparsegpt`` (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot") picks each block of ``block_size`` input columns' mask by ``w^2 / [H^-1]_jj^2`` and spreads
    every removed weight's error over the columns not yet visited; ``wanda`` (Sun et al., 2023, "A Simple
    and Effective Pruning Approach for Large Language Models") removes, per output row, the weights with the
    smallest ``|w| * ||x_j||_2``; ``magnitude`` the smallest ``|w|`` of the layer. Layers are visited in
    execution order, each calibrated on the outputs of the already-pruned layers before it (``H = 2 X X^T / n``
    from ``calibration_samples`` inputs). ``pattern`` ``2:4`` keeps 2 weights in every 4 consecutive inputs
    of a row (``sparsity`` is then implied). Pruned weights are stored sparse (values + bitmap); quantizing
    afterwards keeps them at exactly zero.
    """

    stage_type = "prune_oneshot"

    method: OneShotMethod = OneShotMethod.SPARSEGPT
    sparsity: Annotated[Fraction, Field(lt=1)] = 0.5
    pattern: Pattern = Pattern.UNSTRUCTURED
    calibration_samples: Count = 128
    damp: Annotated[Fraction, Field(gt=0)] = Field(0.01, description="added to the Hessian's diagonal, as a "
                                                   "fraction of its mean")
    block_size: Count = Field(128, description="columns per SparseGPT block (mask selection and lazy update)")
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=lambda: ["lm_head", "*.lm_head"])
    storage: Storage = Storage.SPARSE

    def needs_data(self) -> bool:  # noqa: D102 - wanda and sparsegpt calibrate
        return self.method is not OneShotMethod.MAGNITUDE

    def targets(self, module: Any) -> list[str]:
        """Names of the Linear layers (and transformers' ``Conv1D``, GPT-2's) the stage prunes (include /
        exclude patterns; a weight tied to an earlier module, such as a tied ``lm_head``, is left to it)."""
        import fnmatch

        from torch import nn

        from deepsqueeze.core.kinds import layer_kind
        from deepsqueeze.core.sharing import tied_weight_groups

        tied = {name for places in tied_weight_groups(module) for name, _ in places[1:]}
        linear = [(name, layer) for name, layer in module.named_modules() if name and (
            isinstance(layer, nn.Linear) or getattr(layer_kind(layer), "name", None) == "hf-conv1d")]
        return [name for name, layer in linear
                if name not in tied and layer.weight.numel() > 0
                and (self.include is None or any(fnmatch.fnmatchcase(name, p) for p in self.include))
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)]

    def preflight(self, model: Any) -> None:
        """Some Linear layer matches; under N:M every one's input width is a multiple of M."""
        from deepsqueeze.errors import RecipeError, UnsupportedLayerError

        targets = self.targets(model.module)
        if not targets:
            raise UnsupportedLayerError(f"{model.ref} has no Linear layer matching the include / exclude patterns: "
                                        "prune_oneshot prunes Linear layers (use prune for convolutions)")
        if self.pattern is not Pattern.UNSTRUCTURED:
            m = int(self.pattern.value.split(":")[1])
            odd = [n for n in targets if _in_features(model.module.get_submodule(n)) % m]
            if odd:
                raise RecipeError(f"{self.pattern.value} needs input widths that are multiples of {m}: "
                                  f"{', '.join(odd[:3])} are not; exclude them or prune unstructured")


def _in_features(layer: Any) -> int:
    """Inputs of a Linear, or of transformers' Conv1D (weight of shape (in, out))."""
    return int(getattr(layer, "in_features", None) or layer.weight.shape[0])

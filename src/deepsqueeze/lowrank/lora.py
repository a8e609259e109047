"""LoRA recovery: low-rank adapters on the Linear-like layers of a compressed model.

``LoRALinear`` wraps any layer that maps ``(..., in_features) -> (..., out_features)`` (``nn.Linear``,
``LowRankLinear``, a packed low-bit or sparse Linear whose weights are buffers) and adds
``scale * B(A(x))``; the base stays frozen, only A and B train (QLoRA-style when the base is quantized).

Export (``merge_lora_``):
- ``nn.Linear`` base: ``W += scale * B @ A``, exact, the adapter disappears.
- ``LowRankLinear`` base: ``[second | scale*B] @ [first ; A]``, an exact rank ``r + r_lora`` product.
- any other base (quantized, sparse): the adapter stays as a small fp32 side branch, recorded as the
  transform ``lowrank.lora`` so the loader rebuilds it. Re-quantizing a merged weight would round the
  correction away: a LoRA update is far smaller than a 3-4 bit quantization step, so after rounding
  almost every weight snaps back to its old code (measured in the lora-recovery benchmark).

We use our own module rather than ``peft``: peft's LoRA layers dispatch on known base classes and would
need a custom dispatcher for packed-integer layers whose weights are buffers; ours is 60 lines.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import pydantic
import torch
from pydantic import Field
from torch import nn

from deepsqueeze.core.config import (
    Count,
    Epochs,
    Flag,
    Fraction,
    LearningRate,
    StageConfig,
    Weight,
    register_stage,
)
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import Size, TransformParams, get_record, record_transform, register_transform
from deepsqueeze.core.walker import get_submodule, iter_modules, set_submodule
from deepsqueeze.errors import ArtifactError, DataError, RecipeError, UnsupportedLayerError
from deepsqueeze.runtime import LowRankLinear


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) * B(A(dropout(x)))`` with ``A`` Kaiming-initialised and ``B = 0``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 in_features: int | None = None, out_features: int | None = None) -> None:
        super().__init__()
        in_f = in_features if in_features is not None else getattr(base, "in_features", None)
        out_f = out_features if out_features is not None else getattr(base, "out_features", None)
        if in_f is None or out_f is None:
            raise UnsupportedLayerError(
                f"LoRA needs a Linear-like layer with in_features/out_features, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features, self.rank = int(in_f), int(out_f), int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / self.rank
        ref = next(iter(base.parameters()), None)
        if ref is None:
            ref = next(iter(base.buffers()), None)
        device = ref.device if ref is not None else None
        self.lora_a = nn.Linear(self.in_features, self.rank, bias=False, device=device)
        self.lora_b = nn.Linear(self.rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The ``(out, in)`` update the adapter adds: ``scale * B @ A``."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scale

    def merged(self) -> nn.Module | None:
        """An equivalent module without the adapter, or None when the base cannot absorb it exactly."""
        base = self.base
        with torch.no_grad():
            if type(base) is nn.Linear:
                out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=base.weight.device, dtype=base.weight.dtype)
                out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
                if base.bias is not None:
                    out.bias.copy_(base.bias)
                return out
            if isinstance(base, LowRankLinear):
                out = LowRankLinear(base.in_features, base.out_features, base.rank + self.rank,
                                    bias=base.second.bias is not None).to(base.first.weight.device)
                out.first.weight.copy_(torch.cat([base.first.weight, self.lora_a.weight]))
                out.second.weight.copy_(torch.cat([base.second.weight, self.lora_b.weight * self.scale], dim=1))
                if base.second.bias is not None:
                    out.second.bias.copy_(base.second.bias)
                return out
        return None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora_(model: nn.Module | Model, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
              include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the matching Linear-like layers with adapters.

    A layer is Linear-like when it is an ``nn.Linear`` or has ``in_features``/``out_features`` and
    is not itself inside a wrapped layer. Returns the wrapped names.
    """
    root = model.module if isinstance(model, Model) else model
    for p in root.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []

    def linear_like(name: str, module: nn.Module) -> bool:
        if isinstance(module, LoRALinear) or any(name.startswith(w + ".") for w in wrapped):
            return False
        return isinstance(module, nn.Linear) or (
            hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, nn.Embedding))

    for name, module in iter_modules(root, include=include, exclude=exclude):
        if any(name.startswith(w + ".") for w in wrapped) or not linear_like(name, module):
            continue
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("first", "second") and \
                isinstance(get_submodule(root, name.rpartition(".")[0]), LowRankLinear):
            continue  # the LowRankLinear itself is wrapped, not its factors
        set_submodule(root, name, LoRALinear(module, rank, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        raise UnsupportedLayerError("LoRA found no Linear-like layer to adapt: check include/exclude")
    return wrapped


def lora_parameters(model: nn.Module | Model) -> list[nn.Parameter]:
    """The adapter parameters (what LoRA trains)."""
    root = model.module if isinstance(model, Model) else model
    return [p for m in root.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_a.weight, m.lora_b.weight)]


def merge_lora_(model: nn.Module | Model) -> dict[str, str]:
    """Fold every adapter into its base where that is exact; keep the rest as recorded side branches.

    Returns ``{layer: "merged" | "side-branch"}``. Parameters are left trainable again afterwards.
    """
    root = model.module if isinstance(model, Model) else model
    result = {}
    for name, module in iter_modules(root, types=LoRALinear):
        merged = module.merged()
        if merged is not None:
            set_submodule(root, name, merged)
            result[name] = "merged"
            if isinstance(merged, LowRankLinear):
                record_transform(root, "lowrank.lora_merge_rank", name, rank=merged.rank)
        else:
            record_transform(root, "lowrank.lora", name, rank=module.rank, alpha=module.alpha,
                             in_features=module.in_features, out_features=module.out_features)
            _rename_encodings(root, f"{name}.", f"{name}.base.")
            result[name] = "side-branch"
    for p in root.parameters():
        p.requires_grad_(True)
    return result


def _rename_encodings(root: nn.Module, old_prefix: str, new_prefix: str) -> None:
    """The base layer's tensors moved under ``.base``: keep their recorded encodings attached."""
    record = get_record(root)
    for key in [k for k in record.encodings if k.startswith(old_prefix) and not k.startswith(new_prefix)]:
        record.encodings[new_prefix + key[len(old_prefix):]] = record.encodings.pop(key)


class LoRAParams(TransformParams):
    rank: Size
    alpha: Annotated[float, pydantic.Field(allow_inf_nan=False)]
    in_features: Size
    out_features: Size


@register_transform("lowrank.lora", params=LoRAParams)
def _replay_lora(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    base = get_submodule(root, target)
    for key in ("in_features", "out_features"):
        have = getattr(base, key, None)
        if have is not None and have != params[key]:
            raise ArtifactError(f"LoRA {key}={params[key]} does not fit {target!r} ({key}={have})")
    if params["rank"] > max(params["in_features"], params["out_features"]):
        raise ArtifactError(f"LoRA rank {params['rank']} of {target!r} exceeds the layer's width")
    if not any(p.numel() for p in base.parameters()) and not any(b.numel() for b in base.buffers()):
        raise ArtifactError(f"LoRA target {target!r} holds no weights")
    set_submodule(root, target, LoRALinear(base, int(params["rank"]), float(params["alpha"]),
                                           in_features=int(params["in_features"]),
                                           out_features=int(params["out_features"])))


class MergeRankParams(TransformParams):
    rank: Size


@register_transform("lowrank.lora_merge_rank", params=MergeRankParams)
def _replay_merge_rank(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    base = get_submodule(root, target)
    if not isinstance(base, LowRankLinear):
        raise UnsupportedLayerError(f"lowrank.lora_merge_rank expects a LowRankLinear at {target}, "
                                    f"found {type(base).__name__}")
    if int(params["rank"]) > base.in_features + base.out_features:
        raise ArtifactError(f"rank {params['rank']} of {target!r} exceeds the layer's width")
    set_submodule(root, target, LowRankLinear(base.in_features, base.out_features, int(params["rank"]),
                                              bias=base.second.bias is not None))


class LoRALoss(StrEnum):
    TASK = "task"  # cross-entropy on labels (classifiers) or on the next tokens (causal LMs)
    # match the reference model: soft targets (classifiers), cosine (sentence encoders), next-token KL plus
    # next-token cross-entropy (causal LMs)
    DISTILL = "distill"


class LoRAConfig(StageConfig):
    """Train low-rank adapters on a compressed model with its base weights frozen, then merge them."""

    def needs_data(self) -> bool:  # noqa: D102 - LoRA always trains
        return True

    stage_type: ClassVar[str] = "lora"

    rank: Count = 8
    alpha: Weight | None = Field(None, gt=0)
    dropout: Fraction = Field(0.0, lt=1)
    include: list[str] | None = None
    exclude: list[str] | None = None
    loss: LoRALoss = LoRALoss.DISTILL
    epochs: Epochs = Field(1.0, gt=0)
    lr: LearningRate = 1e-3
    batch_size: Count = 64
    temperature: Weight = Field(4.0, gt=0)
    merge: Flag = True


@register_stage(LoRAConfig)
def lora_stage(model: Model, config: LoRAConfig, ctx: StageContext) -> None:
    """Recipe stage ``{"type": "lora", ...}``: add adapters, train them, merge them."""
    if ctx.data is None:
        raise DataError("the lora stage needs training data: pass --data or set 'data:' in the recipe")
    if config.loss is LoRALoss.DISTILL and ctx.reference is None:
        raise RecipeError("lora with loss 'distill' needs the uncompressed reference model in the context")
    wrapped = add_lora_(model, config.rank, config.alpha, config.dropout, config.include, config.exclude)
    params = lora_parameters(model)
    stats = train_adapters(model, ctx, params, loss=config.loss, epochs=config.epochs, lr=config.lr,
                           batch_size=config.batch_size, temperature=config.temperature)
    merged = merge_lora_(model) if config.merge else {}
    ctx.report.append({"stage": "lora", "objective": objective(model.task, config.loss),
                       "layers": len(wrapped), "trained_params": sum(p.numel() for p in params),
                       "train_loss": round(stats["loss"], 5),
                       "side_branches": sum(v == "side-branch" for v in merged.values())})


def objective(task: Task, loss: LoRALoss) -> str:
    """What the adapters of a ``task`` model are trained to minimise with ``loss``."""
    if task is Task.CAUSAL_LM:
        return "next-token cross-entropy" + (" + KL to the reference" if loss is LoRALoss.DISTILL else "")
    if task is Task.CLASSIFIER:
        return "cross-entropy on labels" if loss is LoRALoss.TASK else "soft targets of the reference"
    return "embedding cosine to the reference" if task is Task.SENTENCE_ENCODER else "output cosine to the reference"


def train_adapters(model: Model, ctx: StageContext, params: list[nn.Parameter], *, loss: LoRALoss,
                   epochs: float, lr: float, batch_size: int, temperature: float = 4.0) -> dict[str, float]:
    """Train ``params`` with the task loss or by distilling from ``ctx.reference`` (teacher): classifiers on
    labels or soft targets, sentence encoders by embedding cosine, causal LMs on next-token cross-entropy
    over the data's own tokens plus (``distill``) the KL to the teacher's next-token distributions at
    ``temperature`` (the LM objective of the distill stage's ``lm_weight``)."""
    from deepsqueeze.train.loop import fit, train_classifier
    from deepsqueeze.train.losses import embedding_loss, soft_target_loss

    common: dict[str, Any] = dict(epochs=epochs, lr=lr, seed=ctx.seed, progress=ctx.progress, params=params)
    teacher = ctx.reference.module.eval() if ctx.reference is not None else None
    if model.task is Task.CLASSIFIER:
        if loss is LoRALoss.TASK or teacher is None:
            return train_classifier(model.module, ctx.data, batch_size=batch_size, **common)

        def kd(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                t = teacher(x)
            return soft_target_loss(module(x), t, y, temperature=temperature, alpha=0.9)

        return train_classifier(model.module, ctx.data, batch_size=batch_size, loss_fn=kd, **common)
    sentences = list(ctx.data.sentences)
    from deepsqueeze.train.text import sentence_batches

    batches, steps = sentence_batches(model.module, sentences, batch_size, ctx.seed)
    if model.task is Task.CAUSAL_LM:
        from deepsqueeze.train.losses import logits_kl, next_token_loss

        def lm(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, mask = module(**inputs), inputs["attention_mask"]
            ce = next_token_loss(logits, inputs["input_ids"], mask)
            if loss is LoRALoss.TASK or teacher is None:
                return ce
            with torch.no_grad():
                t = teacher(**inputs)
            return ce + logits_kl(logits, t, mask, temperature)

        return fit(model.module, batches, lm, steps_per_epoch=steps, description="LoRA recovery", **common)
    if teacher is None:
        raise RecipeError("LoRA on a sentence encoder trains by distillation: it needs the reference model")

    def cos(module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(**inputs)
        return embedding_loss(module(**inputs), t)

    return fit(model.module, batches, cos, steps_per_epoch=steps, description="LoRA recovery", **common)

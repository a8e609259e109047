"""The ``finetune`` recipe stage: plain supervised fine-tuning (classifiers) or embedding
matching to the uncompressed model (sentence encoders), through the one training loop."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from pydantic import Field

from deepsqueeze.core.config import Count, Epochs, LearningRate, StageConfig, Weight, register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.outputs import class_logits, output_tensors
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError
from deepsqueeze.train.loop import fit, train_classifier


class Optimizer(str, Enum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class Schedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"
    ONECYCLE = "onecycle"


class FinetuneConfig(StageConfig):
    """Fine-tune every trainable parameter for ``epochs`` (fractions allowed) on the recipe's data."""

    def needs_data(self) -> bool:  # noqa: D102 - fine-tuning always trains
        return True

    stage_type = "finetune"

    epochs: Epochs = Field(1.0, gt=0)
    lr: LearningRate = 1e-4
    batch_size: Count = 128
    optimizer: Optimizer = Optimizer.ADAM
    schedule: Schedule = Schedule.COSINE
    weight_decay: Weight = 0.0
    limit: Count | None = Field(None, description="use at most this many training samples")


@register_stage(FinetuneConfig)
def finetune(model: Model, config: FinetuneConfig, ctx: StageContext) -> None:
    stats = finetune_model(model, ctx, batch_size=config.batch_size, limit=config.limit, epochs=config.epochs,
                           lr=config.lr, optimizer=config.optimizer.value, schedule=config.schedule.value,
                           weight_decay=config.weight_decay, what="the finetune stage")
    ctx.report.append({"stage": "finetune", "train_loss": round(stats["loss"], 5)})


def finetune_model(model: Model, ctx: StageContext, *, batch_size: int, limit: int | None = None,
                   what: str = "fine-tuning", **fit_args: Any) -> dict[str, float]:
    """Fine-tune ``model`` on ``ctx.data`` through the one loop: labels for classifiers, embedding matching
    to ``ctx.reference`` for sentence encoders. ``fit_args`` go to ``fit`` (epochs, lr, hooks, ...)."""
    if ctx.data is None:
        raise DataError(f"{what} needs training data: pass --data or set 'data:' in the recipe")
    fit_args = {"seed": ctx.seed, "progress": ctx.progress, **fit_args}
    if model.task is Task.CLASSIFIER:
        if not isinstance(ctx.data, ClassificationData):
            raise DataError(f"fine-tuning a classifier needs image data, not {ctx.data.name}")
        if not gives_class_logits(model, ctx.data):
            return match_outputs(model, ctx, batch_size, limit, **fit_args)
        return train_classifier(model.module, ctx.data, batch_size=batch_size, device=ctx.device, limit=limit,
                                **fit_args)
    if not isinstance(ctx.data, TextData):
        raise DataError(f"fine-tuning a sentence encoder needs sentences, not {ctx.data.name}")
    if ctx.reference is None:
        raise DataError("fine-tuning a sentence encoder needs the uncompressed model as its reference")
    return match_embeddings(model, ctx, batch_size, limit, **fit_args)


def gives_class_logits(model: Model, data: ClassificationData) -> bool:
    """Whether ``model``'s output on two training images holds class logits to train on with labels."""
    was_training = model.module.training
    device = next((p.device for p in model.module.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = model.module.eval()(data.train_x[:2].to(device))
    finally:
        model.module.train(was_training)
    return class_logits(out, data.num_classes) is not None


def match_outputs(model: Model, ctx: StageContext, batch_size: int, limit: int | None,
                  **fit_args: Any) -> dict[str, float]:
    """Train a model whose output is not class logits (a detector's boxes and scores, a decoder's image)
    so every output tensor matches the uncompressed reference's on the training images (mean squared error)."""
    if ctx.reference is None:
        raise DataError("fine-tuning a model without class logits matches the uncompressed model's outputs: "
                        "it needs that model as its reference")
    teacher = ctx.reference.module.to(ctx.device).eval()
    data = ctx.data

    def batches(epoch: int):
        for x, _ in data.batches("train", batch_size, shuffle=True, seed=ctx.seed * 1000 + epoch, limit=limit):
            yield x.to(ctx.device)

    def loss(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = output_tensors(teacher(x))
        got = output_tensors(m(x))
        return sum(torch.nn.functional.mse_loss(g.float(), t.float()) for g, t in zip(got, target, strict=True))

    n = len(data.train_x) if limit is None else min(limit, len(data.train_x))
    return fit(model.module.to(ctx.device), batches, loss, steps_per_epoch=-(-n // batch_size),
               description="matching the uncompressed model's outputs", **fit_args)


def match_embeddings(model: Model, ctx: StageContext, batch_size: int, limit: int | None,
                     **fit_args: object) -> dict[str, float]:
    """Train a sentence encoder so its embeddings match the reference model's (cosine loss)."""
    assert ctx.reference is not None
    sentences = ctx.data.sentences[:limit] if limit else ctx.data.sentences
    module, teacher = model.module.to(ctx.device), ctx.reference.module.to(ctx.device)
    batches_cache = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            inputs = {k: v.to(ctx.device) for k, v in module.tokenize(sentences[i : i + batch_size]).items()}
            batches_cache.append((inputs, teacher(**inputs)))

    def batches(epoch: int):
        order = torch.randperm(len(batches_cache), generator=torch.Generator().manual_seed(ctx.seed + epoch))
        return (batches_cache[i] for i in order.tolist())

    def cosine_loss(m: torch.nn.Module, batch) -> torch.Tensor:
        inputs, target = batch
        return (1 - torch.nn.functional.cosine_similarity(m(**inputs), target, dim=-1)).mean()

    return fit(module, batches, cosine_loss, steps_per_epoch=len(batches_cache),
               description="matching embeddings", **fit_args)

"""``distill_``: train a student to imitate a teacher (prepare the student, then train, as one verb).

Classifiers: Hinton soft targets (+ optional FitNets hints through learned adapters).
Sentence encoders: embedding matching (cosine or MSE) + hidden states of mapped layers (TinyBERT)
+ optional attention maps (MiniLM). The student is the model itself (e.g. after pruning), a copy of
the teacher with layers dropped (``keep-layers``), or a fresh smaller zoo model (``zoo:NAME``).
"""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from deepsqueeze.core.config import (
    Count,
    Epochs,
    Flag,
    Fraction,
    Index,
    LearningRate,
    StageConfig,
    Weight,
    register_stage,
)
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.walker import get_submodule
from deepsqueeze.distill.students import alternate_layers, find_layer_stack, keep_layers_
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.train.losses import (
    HintAdapter,
    attention_loss,
    embedding_loss,
    hidden_state_loss,
    hint_loss,
    logits_kl,
    next_token_loss,
)


class EmbeddingLoss(StrEnum):
    COSINE = "cosine"
    MSE = "mse"


class DistillConfig(StageConfig):
    """Distil the model (the student) from a teacher, by default the uncompressed reference model.

    ``student``: ``self`` (train the current model), ``keep-layers`` (drop layers of the current model
    to ``keep`` / ``num_layers``, initialised from the kept ones), or ``zoo:NAME`` (a fresh zoo model).
    ``hints``: FitNets pairs ``[student_module, teacher_module]`` matched through a learned adapter.
    ``dropout``: keep the student's dropout active while it trains (off by default: the target is a
    fixed teacher, and noise slows short distillation runs down).
    ``augment``: for sentence encoders, add this many variants of every training sentence (spans, word
    dropout, joined pairs: ``augment_sentences``); the teacher labels them, so they are free supervision.
    ``lm_weight``: for causal LMs, the weight of the next-token cross-entropy on the data's own tokens, added
    to ``embedding_weight`` x the KL to the teacher's next-token distributions (the LM objective recovery after
    block removal trains with; Kim et al. 2024, "Shortened LLaMA", recover with the LM loss).
    """

    def needs_data(self) -> bool:  # noqa: D102 - distillation always trains
        return True

    def preflight(self, model: Any) -> None:
        """``keep-layers`` keeps indices the model's layer stack has; a ``zoo:`` student needs an image
        classifier with a known input shape and class count; ``lm_weight`` needs a causal LM."""
        if self.lm_weight and model.task is not Task.CAUSAL_LM:
            raise RecipeError(f"lm_weight trains on next tokens, but {model.ref} is a {model.task.value}: set it "
                              "to 0 (or distil a causal LM)")
        if self.student.startswith("zoo:") and (model.task is not Task.CLASSIFIER or model.input_shape is None
                                                or model.num_classes is None):
            raise RecipeError(f"a {self.student} student is an image classifier, but {model.ref} is a "
                              f"{model.task.value}" + (" without a known input shape and class count (pass --data)"
                                                       if model.task is Task.CLASSIFIER else "") +
                              ": use student self or keep-layers")
        if self.student == "keep-layers" and self.keep:
            n = len(get_submodule(model.module, self.layers_path or find_layer_stack(model.module)))
            if max(self.keep) >= n:
                raise RecipeError(f"distill keeps layers {list(self.keep)} but {model.ref} has {n}: keep indices "
                                  f"in 0..{n - 1} (or set num_layers)")

    stage_type: ClassVar[str] = "distill"

    student: str = "self"
    teacher: str | None = None
    num_layers: Count | None = None
    keep: list[Index] | None = None
    layers_path: str | None = None
    epochs: Epochs = Field(3.0, gt=0)
    lr: LearningRate = 1e-3
    batch_size: Count = 64
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    weight_decay: Weight = 0.0
    temperature: Weight = Field(4.0, gt=0)
    alpha: Fraction = 0.9
    hints: list[tuple[str, str]] = Field(default_factory=list)
    hint_weight: Weight = 1.0
    embedding_loss: EmbeddingLoss = EmbeddingLoss.COSINE
    embedding_weight: Weight = 1.0
    hidden_weight: Weight = 1.0
    attention_weight: Weight = 0.0
    lm_weight: Weight = 0.0
    limit: Count | None = None
    dropout: Flag = False
    augment: Annotated[Index, Field(le=1000)] = 0


def prepare_student_(model: Model, config: DistillConfig) -> list[int] | None:
    """Turn ``model`` into the student the config names; return the kept teacher layers (keep-layers)."""
    if config.student == "self":
        return None
    if config.student == "keep-layers":
        path = config.layers_path or find_layer_stack(model.module)
        n = len(get_submodule(model.module, path))
        keep = list(config.keep) if config.keep else alternate_layers(n, config.num_layers or max(1, n // 2))
        keep_layers_(model.module, keep, path)
        return keep
    if config.student.startswith("zoo:"):
        if model.task is not Task.CLASSIFIER or model.input_shape is None or model.num_classes is None:
            raise RecipeError("a zoo: student needs a classifier teacher with a known input shape and class count")
        from deepsqueeze.zoo.builders import ZOO, build_zoo_model

        name = config.student[4:]
        if name not in ZOO:
            raise RecipeError(f"unknown zoo student {name!r}: choose one of {', '.join(ZOO)}")
        model.module = build_zoo_model(name, model.input_shape, model.num_classes)
        # the artifact rebuilds the student's architecture, whatever the teacher's base was (zoo, py:, hf:)
        model.base = {"kind": "zoo", "name": name, "input_shape": list(model.input_shape),
                      "num_classes": model.num_classes,
                      **({"data": model.base["data"]} if model.base.get("data") else {})}
        return None
    raise RecipeError(f"unknown student {config.student!r}: use self, keep-layers or zoo:NAME")


def distill_(model: Model, teacher: nn.Module, config: DistillConfig, data: Any, *, seed: int = 0,
             progress: bool = True, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Prepare the student named by ``config`` in ``model`` and train it against ``teacher`` on ``data``."""
    keep = prepare_student_(model, config)
    teacher = teacher.to(device).eval()  # run under no_grad in the losses; its flags are left as they are
    module = model.module.to(device)
    for p in module.parameters():  # the student trains as a whole (a copy of a frozen model included)
        if p.is_floating_point():
            p.requires_grad_(True)
    if model.task is Task.CLASSIFIER:
        stats = _distill_classifier(module, teacher, config, data, seed, progress, device)
    else:
        stats = _distill_text(module, teacher, model.task, config, data, keep, seed, progress, device)
    module.eval()
    return {**stats, "params": count_params(module), "kept_layers": keep}


def _distill_classifier(module: nn.Module, teacher: nn.Module, config: DistillConfig, data: Any, seed: int,
                        progress: bool, device: Any) -> dict[str, float]:
    from deepsqueeze.data.datasets import ClassificationData
    from deepsqueeze.train.loop import train_classifier
    from deepsqueeze.train.losses import soft_target_loss

    if not isinstance(data, ClassificationData):
        raise DataError(f"distilling a classifier needs image data, not {getattr(data, 'name', data)}")
    features: dict[str, torch.Tensor] = {}
    handles = []
    adapters = nn.ModuleList()
    for i, (s_name, t_name) in enumerate(config.hints):
        for prefix, root, name in (("s", module, s_name), ("t", teacher, t_name)):
            try:
                target = get_submodule(root, name)
            except AttributeError:
                raise RecipeError(f"hint layer {name!r} does not exist in the {'student' if prefix == 's' else 'teacher'}"
                                  ) from None
            handles.append(target.register_forward_hook(
                lambda m, a, out, key=f"{prefix}{i}": features.__setitem__(key, out)))
    if config.hints:
        with torch.no_grad():
            x0 = data.train_x[:2].to(device)
            module.eval()
            module(x0)
            teacher(x0)
        for i in range(len(config.hints)):
            s, t = features[f"s{i}"], features[f"t{i}"]
            adapters.append(HintAdapter(s.shape[1], t.shape[1], conv=s.dim() == 4).to(device))
        module.add_module("_hint_adapters", adapters)  # trained with the student, removed afterwards

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            t_logits = teacher(x)
        loss = soft_target_loss(m(x), t_logits, y, temperature=config.temperature, alpha=config.alpha)
        for i in range(len(config.hints)):
            loss = loss + config.hint_weight * hint_loss(features[f"s{i}"], features[f"t{i}"], adapters[i])
        return loss

    try:
        return train_classifier(module, data, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                                optimizer=config.optimizer, schedule=config.schedule,
                                weight_decay=config.weight_decay, loss_fn=loss_fn, device=device, seed=seed,
                                progress=progress, limit=config.limit, dropout=config.dropout)
    finally:
        for handle in handles:
            handle.remove()
        if config.hints:
            del module._hint_adapters


def _distill_text(module: nn.Module, teacher: nn.Module, task: Task, config: DistillConfig, data: Any,
                  keep: list[int] | None, seed: int, progress: bool, device: Any) -> dict[str, float]:
    """Sentence encoders match the teacher's embedding; sequence classifiers and causal LMs its label or
    next-token distributions (:func:`~deepsqueeze.train.losses.logits_kl`); all match hidden states layer by layer."""
    from deepsqueeze.data.datasets import TextData
    from deepsqueeze.train.loop import fit
    from deepsqueeze.train.text import augment_sentences, sentence_batches

    if not isinstance(data, TextData):
        raise DataError(f"distilling a {task.value} needs sentences, not {getattr(data, 'name', data)}")
    sentences = list(data.sentences[: config.limit] if config.limit else data.sentences)
    if config.augment:
        sentences = augment_sentences(sentences, config.augment, seed)
    use_attn = config.attention_weight > 0
    if use_attn:
        for m in (module, teacher):
            m.transformer.set_attn_implementation("eager")  # type: ignore[union-attr,operator]
    want_inner = config.hidden_weight > 0 or use_attn
    batches, steps = sentence_batches(module, sentences, config.batch_size, seed)

    def run(m: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        out = m.transformer(**inputs, output_hidden_states=want_inner, output_attentions=use_attn)  # type: ignore[operator]
        if task is not Task.SENTENCE_ENCODER:
            return out.logits, out
        pool = getattr(m, "pool", None)
        if callable(pool):  # the encoder's own pooling and head (Dense, LayerNorm, Normalize)
            return pool(out.last_hidden_state, inputs["attention_mask"]), out
        mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9), out

    def loss_fn(m: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            t_emb, t_out = run(teacher, inputs)
        s_emb, s_out = run(m, inputs)
        mask = inputs["attention_mask"]
        if task is Task.SENTENCE_ENCODER:
            loss = config.embedding_weight * embedding_loss(s_emb, t_emb, config.embedding_loss.value)
        else:
            loss = config.embedding_weight * logits_kl(s_emb, t_emb, mask, config.temperature)
        if task is Task.CAUSAL_LM and config.lm_weight > 0:
            loss = loss + config.lm_weight * next_token_loss(s_emb, inputs["input_ids"], mask)
        if not want_inner:
            return loss
        n_student, n_teacher = len(s_out.hidden_states) - 1, len(t_out.hidden_states) - 1
        mapping = keep if keep is not None else alternate_layers(n_teacher, n_student)
        for i, t_layer in enumerate(mapping):
            if config.hidden_weight > 0:
                loss = loss + config.hidden_weight / len(mapping) * hidden_state_loss(
                    s_out.hidden_states[i + 1], t_out.hidden_states[t_layer + 1], mask)
            if use_attn:
                loss = loss + config.attention_weight / len(mapping) * attention_loss(
                    s_out.attentions[i], t_out.attentions[t_layer], mask)
        return loss

    try:
        return fit(module, batches, loss_fn, epochs=config.epochs, steps_per_epoch=steps, lr=config.lr,
                   optimizer=config.optimizer, schedule=config.schedule, weight_decay=config.weight_decay,
                   seed=seed, progress=progress, description="distilling", dropout=config.dropout)
    finally:
        if use_attn:
            for m in (module, teacher):
                m.transformer.set_attn_implementation("sdpa")  # type: ignore[union-attr,operator]


@register_stage(DistillConfig)
def distill_stage(model: Model, config: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    """Recipe stage ``{"type": "distill", ...}``: teacher = ``teacher`` ref or the uncompressed reference.

    Returns :func:`distill_`'s statistics (QAT trains through this stage, found by name in the registry)."""
    if ctx.data is None:
        raise DataError("the distill stage needs training data: pass --data or set 'data:' in the recipe")
    if config.teacher is not None:
        from deepsqueeze.resolve import resolve_file_reference

        teacher = resolve_file_reference(config.teacher, "the recipe's distill teacher", ctx.named_refs,
                                         option="--teacher", progress=ctx.progress, model_code=ctx.model_code).module
    elif ctx.reference is not None:
        teacher = ctx.reference.module
    else:
        teacher = copy.deepcopy(model.module)
    stats = distill_(model, teacher, config, ctx.data, seed=ctx.seed, progress=ctx.progress, device=ctx.device)
    ctx.report.append({"stage": "distill", "student": config.student, "params_after": stats["params"],
                       "train_loss": round(stats["loss"], 5)})
    return stats

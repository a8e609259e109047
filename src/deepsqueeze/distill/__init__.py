"""Knowledge distillation: soft targets, hints, transformer layer losses, embedding matching, layer-dropped students."""

from deepsqueeze.distill.distill import DistillConfig, EmbeddingLoss, distill_, prepare_student_
from deepsqueeze.distill.students import alternate_layers, find_layer_stack, keep_layers_
from deepsqueeze.train.losses import (
    HintAdapter,
    attention_loss,
    embedding_loss,
    hidden_state_loss,
    hint_loss,
    soft_target_loss,
)
from deepsqueeze.train.text import augment_sentences, sentence_batches

__all__ = [
    "DistillConfig",
    "EmbeddingLoss",
    "HintAdapter",
    "alternate_layers",
    "attention_loss",
    "augment_sentences",
    "distill_",
    "embedding_loss",
    "find_layer_stack",
    "hidden_state_loss",
    "hint_loss",
    "keep_layers_",
    "prepare_student_",
    "sentence_batches",
    "soft_target_loss",
]

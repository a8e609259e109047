"""Deprecated: the distillation losses moved to :mod:`deepsqueeze.train.losses` (every stage that learns from
a teacher uses them); ``deepsqueeze.distill`` still exports them. This path works, with a DeprecationWarning,
for one release."""

from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.train import losses

__getattr__ = moved_to(__name__, {losses: ["HintAdapter", "attention_loss", "embedding_loss", "hidden_state_loss",
                                           "hint_loss", "soft_target_loss"]})

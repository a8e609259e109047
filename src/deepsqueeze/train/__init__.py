"""The one training loop every stage that trains uses (zoo models, fine-tuning, pruning, KD, QAT), and what
those stages share to learn from a teacher: the distillation losses (``losses``) and sentence batching
(``text``). Technique folders import train, never the other way round."""

from deepsqueeze.train.loop import fit, seed_everything, train_classifier
from deepsqueeze.train.stage import finetune_model

__all__ = ["finetune_model", "fit", "seed_everything", "train_classifier"]

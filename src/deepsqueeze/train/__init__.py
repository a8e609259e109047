"""The one training loop every stage that trains uses (zoo models, fine-tuning, pruning, KD, QAT)."""

from deepsqueeze.train.loop import fit, seed_everything, train_classifier

__all__ = ["fit", "seed_everything", "train_classifier"]

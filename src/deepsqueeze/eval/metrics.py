"""Quality metrics: classifier accuracy and sentence-embedding fidelity to a reference."""

from __future__ import annotations

import torch
from torch import nn

from deepsqueeze.core.outputs import primary_output
from deepsqueeze.data.datasets import ClassificationData


@torch.no_grad()
def accuracy(module: nn.Module, data: ClassificationData, split: str = "test", batch_size: int = 1000,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy on a full split."""
    module.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size):
        pred = primary_output(module(x.to(device))).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


def embedding_fidelity(emb: torch.Tensor, ref: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Cosine to the reference embeddings (mean and min) and overlap of each item's k nearest neighbours."""
    emb = nn.functional.normalize(emb.float(), dim=-1)
    ref = nn.functional.normalize(ref.float(), dim=-1)
    cos = (emb * ref).sum(-1)
    k = min(k, len(emb) - 1)
    if k < 1:
        agreement = 1.0
    else:
        def neighbours(e: torch.Tensor) -> torch.Tensor:
            sim = e @ e.T
            sim.fill_diagonal_(-float("inf"))
            return sim.topk(k, dim=-1).indices

        a, b = neighbours(emb), neighbours(ref)
        overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1) / k
        agreement = float(overlap.mean())
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        f"neighbor_agreement_at_{k if k == 10 else 10}": agreement,
    }


def encoder_inputs(module: nn.Module, sentences: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tokenized batch for a SentenceEncoder-like module (anything with ``tokenize``)."""
    return {key: value.to(device) for key, value in module.tokenize(sentences).items()}  # type: ignore[operator]


def perplexity(module: nn.Module, texts: list[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu") -> tuple[float, int]:
    """Token-level perplexity of a causal LM on ``texts`` joined into one token stream, scored with a sliding
    window (default 512 tokens, at most the model's ``context_length``; stride half the window):
    ``(perplexity, scored tokens)``. See :func:`deepsqueeze.eval.lm.lm_scores` (which also compares with a
    base model). Raises ``DataError`` when the stream is shorter than two tokens."""
    from deepsqueeze.eval.lm import lm_scores

    scores = lm_scores(module, texts, window, stride, batch_size=batch_size, device=device)
    return scores.perplexity, scores.tokens


def label_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of rows whose top label matches the reference's (sequence classifiers)."""
    return float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()) if len(logits) else 1.0

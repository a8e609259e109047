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


@torch.no_grad()
def perplexity(module: nn.Module, texts: list[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu") -> tuple[float, int]:
    """Token-level perplexity of a causal LM (a ``CausalLM``-like module) on ``texts``.

    The texts are joined with newlines into one stream and tokenized once, without special tokens.
    The stream is scored with a sliding window (the "perplexity of fixed-length models" procedure of
    the Hugging Face docs): windows of ``window`` tokens (default: the model's ``context_length``)
    end every ``stride`` tokens (default: ``window // 2``; ``1 <= stride < window``), and each window
    scores only the tokens no earlier window scored, so every token but the first is predicted
    exactly once, with at least ``window - stride`` tokens of left context after the first window. Returns
    ``(exp(mean negative log-likelihood in nats per token), number of scored tokens)``.
    Raises ``DataError`` when the stream is shorter than two tokens.
    """
    from deepsqueeze.errors import DataError

    window = int(window or getattr(module, "context_length", 256))
    stride = int(stride or max(1, window // 2))
    if window < 2 or not 1 <= stride < window:
        raise DataError(f"perplexity needs a window of at least 2 tokens and a stride in 1..window-1, "
                        f"got window {window}, stride {stride}")
    ids = torch.tensor(module.tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"],  # type: ignore[operator,union-attr]
                       dtype=torch.long)
    n = len(ids)
    if n < 2:
        raise DataError("perplexity needs a text of at least two tokens")
    spans = [(0, min(window, n), min(window, n))]  # (begin, end, tokens scored at the end of the window)
    while spans[-1][1] < n:
        prev_end = spans[-1][1]
        end = min(prev_end + stride, n)
        spans.append((max(0, end - window), end, end - prev_end))
    was_training = module.training
    module.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for i in range(0, len(spans), batch_size):
            group = spans[i : i + batch_size]
            length = max(e - b for b, e, _ in group)
            inputs = torch.zeros(len(group), length, dtype=torch.long)
            mask = torch.zeros(len(group), length, dtype=torch.long)
            targets = torch.full((len(group), length), -100, dtype=torch.long)
            for row, (b, e, scored) in enumerate(group):
                inputs[row, : e - b] = ids[b:e]
                mask[row, : e - b] = 1
                targets[row, e - b - scored : e - b] = ids[e - scored : e]
            logits = module(input_ids=inputs.to(device), attention_mask=mask.to(device)).float().cpu()
            shifted = targets[:, 1:]  # the first token of a window has no prediction
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((shifted != -100).sum())
    finally:
        module.train(was_training)
    return float(torch.exp(torch.tensor(total_nll / total_tokens))), total_tokens


def label_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of rows whose top label matches the reference's (sequence classifiers)."""
    return float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()) if len(logits) else 1.0

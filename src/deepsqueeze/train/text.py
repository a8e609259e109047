"""Batching sentences for training: tokenized once, grouped by length so batches carry little padding."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import torch
from torch import nn


def sentence_batches(module: nn.Module, sentences: list[str], batch_size: int, seed: int = 0
                     ) -> tuple[Callable[[int], Iterable[dict[str, torch.Tensor]]], int]:
    """``(batches(epoch), steps_per_epoch)`` over tokenized ``sentences`` for a SentenceEncoder-like module.

    Sentences are sorted by token length and cut into batches (little padding, so a batch costs what
    its real tokens cost); the batch order is shuffled per epoch with a generator seeded by
    ``seed`` and the epoch, so training is deterministic.
    """
    if not sentences:
        raise ValueError("no sentences to train on")
    tokenizer = module.tokenizer  # type: ignore[attr-defined]
    max_len = getattr(module, "max_seq_length", 256)
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_len)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda i: (lengths[i], i))
    groups = [[sentences[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
    cached = [dict(module.tokenize(g)) for g in groups]  # type: ignore[operator]

    def batches(epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        idx = list(range(len(cached)))
        random.Random(seed * 100_003 + epoch).shuffle(idx)
        return (cached[i] for i in idx)

    return batches, len(cached)


def augment_sentences(sentences: list[str], copies: int = 3, seed: int = 0) -> list[str]:
    """``sentences`` plus ``copies`` deterministic variants of each, for distillation only.

    A teacher labels any text, so more (unlabeled) inputs are free supervision: each variant is a
    random contiguous word span (40-90% of the words), the sentence with 15% of its words dropped, or
    the sentence joined with another one of the same list. Nothing outside ``sentences`` is used.
    """
    rng = random.Random(seed)
    out = list(sentences)
    for i, sentence in enumerate(sentences):
        words = sentence.split()
        for c in range(copies):
            kind = (i + c) % 3
            if kind == 0 and len(words) > 4:
                n = max(3, int(len(words) * rng.uniform(0.4, 0.9)))
                start = rng.randrange(0, len(words) - n + 1)
                out.append(" ".join(words[start : start + n]))
            elif kind == 1 and len(words) > 4:
                kept = [w for w in words if rng.random() > 0.15]
                out.append(" ".join(kept or words))
            else:
                out.append(sentence + " " + sentences[rng.randrange(len(sentences))])
    return out

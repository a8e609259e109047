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

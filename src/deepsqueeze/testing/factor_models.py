"""Toy models for the low-rank and distillation tests (deterministic factories usable as ``py:`` references)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_bert_encoder(num_layers: int = 4) -> nn.Module:
    """A 4-layer, 32-wide BERT sentence encoder with MiniLM's tokenizer and fixed random weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deepsqueeze.zoo.hf import SentenceEncoder, minilm_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    transformer = BertModel(config, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    return SentenceEncoder(transformer, tokenizer, max_seq_length=64).eval()


def small_convnet() -> nn.Sequential:
    """Conv(3->16, 3x3) -> ReLU -> Conv(16->24, 3x3, stride 2) -> pool -> Linear(24->10), fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()

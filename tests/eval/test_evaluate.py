import math

import pytest
import torch

from deepsqueeze.eval import EVALUATION_KEYS, embedding_fidelity, evaluate, measure_latency_interleaved


def test_classifier_report_has_the_public_keys(lenet300_digits, digits):
    result = evaluate(lenet300_digits, digits)
    for key in (*EVALUATION_KEYS, "accuracy"):
        assert key in result
    assert result["params"] == result["nonzero_params"] == lenet300_digits.base_params
    assert result["fp32_bytes"] == 4 * lenet300_digits.base_params
    assert result["artifact_bytes"] is None and result["compression_ratio"] is None
    assert result["samples"] == len(digits.test_y)
    assert 0.9 < result["accuracy"] <= 1.0
    assert result["latency_ms_median"] > 0


def test_fidelity_of_identical_embeddings_is_perfect():
    emb = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    scores = embedding_fidelity(emb, emb.clone())
    assert scores["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert scores["neighbor_agreement_at_10"] == pytest.approx(1.0)


def test_fidelity_detects_damage():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(60, 16, generator=gen)
    noisy = emb + 0.8 * torch.randn(60, 16, generator=gen)
    scores = embedding_fidelity(noisy, emb)
    assert scores["cosine_mean"] < 0.95
    assert scores["cosine_min"] <= scores["cosine_mean"]
    assert 0.0 <= scores["neighbor_agreement_at_10"] < 1.0


def test_interleaved_latency_returns_a_median_per_function():
    x = torch.randn(64, 64)
    times = measure_latency_interleaved({"mm": lambda: x @ x, "add": lambda: x + x}, warmup=1, repeat=5)
    assert set(times) == {"mm", "add"} and all(t > 0 and math.isfinite(t) for t in times.values())


def test_classifier_on_text_data_is_a_clear_error(lenet300_digits):
    from deepsqueeze.data import resolve_data
    from deepsqueeze.errors import DataError

    with pytest.raises(DataError, match="classifier"):
        evaluate(lenet300_digits, resolve_data("pydoc-sentences:eval"), latency=False)


def test_minilm_fidelity_to_itself(minilm):
    from deepsqueeze.data import TextData

    data = TextData("few", ["A short sentence about Python.", "Lists are mutable sequences.",
                            "The with statement wraps a block.", "Integers have unlimited precision."] * 3)
    result = evaluate(minilm, data, minilm, latency=False)
    assert result["params"] == 22_713_216
    assert result["cosine_min"] == pytest.approx(1.0, abs=1e-5)

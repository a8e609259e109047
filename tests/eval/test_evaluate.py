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


def test_latency_summary_flags_wide_spread_and_a_busy_machine():
    """Issue 16, finding 2: a single median on a noisy machine misleads; the spread and the load decide."""
    from deepsqueeze.eval.latency import busy_note, percentile, ratio_stats, summarize

    steady = summarize([10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0, 10.1, 10.2])
    assert steady.reliable and steady.note is None and steady.samples == 10
    assert steady.p10 <= steady.median <= steady.p90 and steady.median == pytest.approx(10.05)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    noisy = summarize([10.0, 10.0, 10.0, 10.0, 40.0, 76.0, 3884.0, 10.0, 10.0, 10.0])
    assert not noisy.reliable and "wide spread" in noisy.note
    assert busy_note(load=18.5, cpus=2) == "machine busy (load average 18.5 on 2 CPUs)"
    assert busy_note(load=1.0, cpus=2) is None
    busy = summarize([10.0] * 10, busy_note(load=18.5, cpus=2))
    assert not busy.reliable and "load average 18.5" in busy.note
    ratio = ratio_stats([20.0, 22.0, 21.0], [10.0, 11.0, 10.5])
    assert ratio.median == pytest.approx(2.0) and ratio.reliable


def test_evaluate_times_against_a_baseline_with_a_spread(lenet300_digits, digits, monkeypatch):
    import deepsqueeze.eval.latency as latency

    monkeypatch.setattr(latency, "machine_load", lambda: (0.5, 2))
    result = evaluate(lenet300_digits, digits, baseline=lenet300_digits, repeat=15, min_seconds=0.0)
    assert set(EVALUATION_KEYS) <= set(result)
    assert result["latency_repeats"] == 15
    assert result["latency_ms_p10"] <= result["latency_ms_median"] <= result["latency_ms_p90"]
    assert result["speedup_p10"] <= result["speedup"] <= result["speedup_p90"]
    assert result["baseline_latency_ms_median"] > 0 and isinstance(result["latency_reliable"], bool)
    monkeypatch.setattr(latency, "machine_load", lambda: (40.0, 2))
    busy = evaluate(lenet300_digits, digits, baseline=lenet300_digits, repeat=5, min_seconds=0.0)
    assert busy["latency_reliable"] is False and "machine busy (load average 40.0 on 2 CPUs)" in busy["latency_note"]
    alone = evaluate(lenet300_digits, digits, latency=False)
    assert alone["latency_ms_median"] is None and alone["latency_reliable"] is None and alone["speedup"] is None


def test_benchmark_runner_flags_unreliable_timings(monkeypatch):
    """Issue 16: bench states, per benchmark, whether its latencies can be trusted (here: a busy machine)."""
    import types

    from benchmarks.runner import BenchContext, run_benchmark

    import deepsqueeze.eval.latency as latency

    x = torch.randn(32, 32)

    def run(ctx):
        times = measure_latency_interleaved({"a": lambda: x @ x, "b": lambda: x + x}, warmup=1, repeat=5)
        return [{"a_ms": times["a"], "b_ms": times["b"]}]

    fake = types.SimpleNamespace(NAME="fake", TITLE="fake", SETUP="", run=run)
    monkeypatch.setattr(latency, "machine_load", lambda: (9.0, 2))
    result = run_benchmark(fake, BenchContext(threads=1, quick=True))
    assert result["latency_reliable"] is False
    assert "machine busy (load average 9.0 on 2 CPUs)" in result["latency_notes"]
    fake.run = lambda ctx: [{"size": 1}]
    assert run_benchmark(fake, BenchContext(threads=1, quick=True))["latency_reliable"] is None


def test_evaluation_talks_off_a_terminal_while_it_measures(lenet300_digits, digits, monkeypatch, capsys):
    """Issue 29: the demo was silent for minutes while MiniLM was evaluated; every evaluation now prints a
    line at least every progress interval off a terminal, through quality scoring and latency timing."""
    import time as _time

    monkeypatch.setenv("DEEPSQUEEZE_PROGRESS_INTERVAL", "0.1")
    module = lenet300_digits.module
    slow_forward = module.forward

    def forward(x):
        _time.sleep(0.2)
        return slow_forward(x)

    monkeypatch.setattr(module, "forward", forward)
    evaluate(lenet300_digits, digits, repeat=3, min_seconds=0.0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "evaluating" in line]
    assert len(lines) >= 3, lines

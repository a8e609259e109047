"""Causal-LM scoring: sliding-window perplexity, next-token and greedy agreement with the base model."""

from __future__ import annotations

import copy

import pytest
import torch

from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import DataError
from deepsqueeze.eval import evaluate
from deepsqueeze.eval.lm import default_window, greedy_agreement, lm_scores, spans
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.hf_models import make_hf_dir

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank, twice a day in spring.",
         "Perplexity is the exponential of the mean negative log-likelihood of each scored token."] * 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return resolve_model(f"hf:{make_hf_dir('llama', tmp_path_factory.mktemp('llama') / 'm')}", progress=False)


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (37, 16, 5), (3, 8, 4), (64, 64, 32), (40, 8, 8)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    got = spans(n, window, stride)
    scored = [t for b, e, k in got for t in range(e - k, e)]
    assert sorted(scored) == list(range(n)) and all(e - b <= window for b, e, _ in got)


def test_the_model_against_itself_agrees_everywhere(llama):
    scores = lm_scores(llama.module, TEXTS, window=64, stride=32, reference=llama.module)
    assert scores.base_perplexity == pytest.approx(scores.perplexity) and scores.top1_agreement == 1.0
    assert scores.to_dict()["perplexity_delta_pct"] == pytest.approx(0.0, abs=1e-9)
    assert greedy_agreement(llama.module, llama.module, TEXTS, prompts=2, prompt_tokens=8, new_tokens=4) == 1.0


def test_a_damaged_copy_disagrees_and_scores_worse(llama):
    damaged = copy.deepcopy(llama.module)
    with torch.no_grad():
        for name, param in damaged.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                param.mul_(-3.0)
    scores = lm_scores(damaged, TEXTS, window=64, stride=32, reference=llama.module)
    assert scores.top1_agreement < 1.0 and scores.perplexity != scores.base_perplexity
    cached = lm_scores(damaged, TEXTS, window=64, stride=32,
                       reference_top1=lm_scores(llama.module, TEXTS, window=64, stride=32).top1)
    assert cached.top1_agreement == scores.top1_agreement and cached.base_perplexity is None
    with pytest.raises(DataError, match="same texts"):
        lm_scores(damaged, TEXTS[:2], window=64, stride=32, reference_top1=scores.top1)
    assert greedy_agreement(damaged, llama.module, TEXTS, prompts=2, prompt_tokens=8, new_tokens=8) < 1.0


def test_window_defaults_and_limits(llama):
    assert default_window(llama.module) == (min(512, llama.module.context_length), min(512, llama.module.context_length) // 2)
    with pytest.raises(DataError, match="past the model's"):
        default_window(llama.module, llama.module.context_length + 1)
    with pytest.raises(DataError, match="stride"):
        default_window(llama.module, 16, 17)


def test_evaluate_states_window_stride_and_agreement(llama):
    result = evaluate(llama, TextData("t", TEXTS), reference=copy.deepcopy(llama), latency=False, window=32,
                      stride=16)
    assert (result["window"], result["stride"]) == (32, 16)
    assert result["samples"] == result["tokens"] > 0
    assert result["top1_agreement"] == 1.0 and result["greedy_agreement"] == 1.0
    assert result["base_perplexity"] == pytest.approx(result["perplexity"])


def test_evaluate_reports_generation_speed_beside_the_baseline(llama):
    result = evaluate(llama, TextData("t", TEXTS), reference=llama, baseline=copy.deepcopy(llama), repeat=3,
                      min_seconds=0.0, window=32, stride=16)
    assert result["gen_prompt_tokens"] == min(128, llama.module.context_length // 2)
    assert result["gen_new_tokens"] == 32
    assert result["prompt_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["decode_tokens_per_s_p10"] <= result["decode_tokens_per_s"] <= result["decode_tokens_per_s_p90"]
    assert result["baseline_decode_tokens_per_s"] > 0 and result["decode_speedup"] > 0
    assert "decode_tokens_per_s" not in evaluate(llama, TextData("t", TEXTS), latency=False, window=32, stride=16)

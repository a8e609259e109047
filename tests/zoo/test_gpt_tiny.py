"""zoo:gpt-tiny (issue 11, item 7): built from code, byte-level, trained on the calib split only, rebuilt from a .dsq."""

import pytest
import torch

pytest.importorskip("transformers")

from deepsqueeze.artifact import load, save  # noqa: E402
from deepsqueeze.core.model import Task  # noqa: E402
from deepsqueeze.data.text import load_pydoc_sentences  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.zoo.gpt import build_gpt_tiny, token_stream  # noqa: E402


def test_untrained_gpt_tiny_is_a_causal_lm_that_round_trips(tmp_path):
    model = resolve_model("zoo:gpt-tiny", progress=False)
    assert model.task is Task.CAUSAL_LM and model.base_params == 1_853_760
    assert model.module.context_length == 128
    save(model, tmp_path / "g.dsq")
    loaded = load(tmp_path / "g.dsq")
    ids = model.module.tokenize(["def f(x): return x"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(**ids), model.module(**ids))


def test_training_stream_never_holds_an_eval_sentence():
    module = build_gpt_tiny()
    stream = bytes(token_stream(module, "calib").tolist())
    assert len(stream) == len("\n".join(load_pydoc_sentences("calib").sentences).encode())
    for sentence in load_pydoc_sentences("eval").sentences[:200]:
        assert sentence.encode() not in stream


def test_bytes_round_trip_through_the_tokenizer():
    tok = build_gpt_tiny().tokenizer
    text = "naïve café — Ωmega\nnew line"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode()) and tok.decode(ids) == text

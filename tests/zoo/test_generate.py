"""Generation with a KV cache on every causal-LM representation deepsqueeze produces: the cached loop gives the
tokens the uncached reference gives; sampling is seeded; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import DataError, ModelError
from deepsqueeze.prune import PruneTransformerConfig, prune_
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.cli import run
from deepsqueeze.testing.hf_models import make_hf_dir

PROMPT = "The quick brown fox"


def _text() -> TextData:
    words = "the cat sat on a mat while the dog ran in the park and the bird sang over the tree".split()
    g = torch.Generator().manual_seed(0)
    return TextData("text:calib", [" ".join(words[int(i)] for i in torch.randint(len(words), (24,), generator=g))
                                   for _ in range(32)])


STAGES = {
    "fp32": [],
    "int8": [{"type": "quantize", "method": "dynamic"}],
    "w4": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16}],
    "w3-gptq-float-zero": [{"type": "quantize", "method": "gptq", "bits": 3, "group_size": 32, "symmetric": False,
                            "zero_point": "float", "calibration_samples": 8}],
    "2:4-sparse": [{"type": "prune_oneshot", "method": "wanda", "pattern": "2:4", "calibration_samples": 8}],
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_the_cached_loop_gives_the_tokens_of_the_uncached_reference(family, kind, tmp_path):
    model = resolve_model(f"hf:{make_hf_dir(family, tmp_path / family)}", progress=False)
    if STAGES[kind]:
        run_stages(model, parse_recipe({"stages": STAGES[kind]}), _text(), progress=False)
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    cached = loaded.generate(PROMPT, max_new_tokens=12)
    reference = loaded.generate(PROMPT, max_new_tokens=12, cache=False)
    assert cached.cache and not reference.cache
    assert len(cached.token_ids) == 12 or cached.stopped == "eos"
    assert cached.token_ids == reference.token_ids
    assert cached.text == reference.text


def test_a_model_with_its_first_block_removed_generates_with_the_cache(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l', num_hidden_layers=3)}", progress=False)
    prune_(model, PruneTransformerConfig(drop_layers=["transformer.model.layers.0"]))
    assert model.generate(PROMPT, max_new_tokens=10).token_ids == \
        model.generate(PROMPT, max_new_tokens=10, cache=False).token_ids


def test_sampling_is_seeded_and_greedy_is_the_zero_temperature(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    a = model.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=3)
    b = model.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=3)
    c = model.generate(PROMPT, max_new_tokens=16, temperature=1.5, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = model.generate(PROMPT, max_new_tokens=16)
    ids = model.module.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        first = model.module(input_ids=torch.tensor([ids]))[0, -1].argmax()
    assert greedy.token_ids[0] == int(first)


def test_generation_stops_at_the_context(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l', max_position_embeddings=32)}", progress=False)
    result = model.generate("abcdefghijklmnopqrstuvwxyz", max_new_tokens=30)
    assert result.stopped in ("context", "eos")
    assert result.prompt_tokens + len(result.token_ids) <= 32


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 10**9}, "max new tokens"),
    ({"max_new_tokens": 0}, "max new tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_bad_generation_settings_are_refused(tmp_path, kwargs, match):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    with pytest.raises(DataError, match=match):
        model.generate(PROMPT, **kwargs)


def test_a_prompt_longer_than_the_context_and_a_missing_chat_template_are_refused(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    with pytest.raises(DataError, match="context is 128"):
        model.generate("x" * 400)
    with pytest.raises(ModelError, match="chat template"):
        model.generate(PROMPT, chat=True)


def test_the_cli_generates_as_json_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    folder = make_hf_dir("llama", tmp_path / "l")
    code, out, _ = run(capsys, "generate", f"hf:{folder}", "--prompt", PROMPT, "--max-new-tokens", "8", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["new_tokens"] == len(report["token_ids"]) <= 8 and report["prompt_tokens"] > 0
    assert report["prompt_tokens_per_s"] > 0
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xc3")
    for argv, match in [
        (("--prompt-file", str(bad)), "not UTF-8"),
        (("--prompt", PROMPT, "--max-new-tokens", str(10**9)), "max new tokens"),
        (("--prompt", "y" * 600), "shorten the prompt"),
        ((), "--prompt TEXT or --prompt-file"),
    ]:
        code, out, err = run(capsys, "generate", f"hf:{folder}", *argv)
        assert code == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, capsys):
    folder = make_hf_dir("bert", tmp_path / "b")
    code, _, err = run(capsys, "generate", f"hf:{folder}", "--prompt", PROMPT)
    assert code == 2 and "not a causal LM" in err


def test_token_ids_are_a_prompt_and_ignore_eos_runs_the_full_length(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    ids = model.module.tokenizer(PROMPT)["input_ids"]
    assert model.generate(ids, max_new_tokens=6).token_ids == model.generate(PROMPT, max_new_tokens=6).token_ids
    eos = model.module.tokenizer.eos_token_id
    result = model.generate([eos, eos], max_new_tokens=20, ignore_eos=True)
    assert len(result.token_ids) == 20 and result.stopped == "length"
    with pytest.raises(DataError, match="token ids"):
        model.generate([10**6])

"""Hugging Face families through ``hf:DIR`` (issue 11, findings 5-6): detected from the config, compressed,
written only if they run, and evaluated from the artifact without a transformers traceback."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from deepsqueeze.core.model import Task  # noqa: E402
from deepsqueeze.data.datasets import TextData  # noqa: E402
from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.eval import evaluate  # noqa: E402
from deepsqueeze.eval.metrics import perplexity  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.testing.cli import run  # noqa: E402
from deepsqueeze.testing.hf_models import make_hf_dir  # noqa: E402
from deepsqueeze.zoo.hf import detect_hf_task  # noqa: E402

TASKS = {
    "bert": Task.SENTENCE_ENCODER, "roberta": Task.SENTENCE_ENCODER, "distilbert": Task.SENTENCE_ENCODER,
    "albert": Task.SENTENCE_ENCODER, "bert-classifier": Task.SEQUENCE_CLASSIFIER,
    "gpt2": Task.CAUSAL_LM, "llama": Task.CAUSAL_LM, "qwen2": Task.CAUSAL_LM,
}
QUALITY = {Task.SENTENCE_ENCODER: "cosine_mean", Task.SEQUENCE_CLASSIFIER: "label_agreement",
           Task.CAUSAL_LM: "perplexity"}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: make_hf_dir(family, root / family) for family in TASKS}


def one_line_error(code: int, out: str, err: str) -> str:
    """The error is one line (progress log lines of the stages that ran before it may precede it)."""
    from deepsqueeze.core.progress import LOG_PREFIX

    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(LOG_PREFIX)]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("family", list(TASKS))
def test_every_family_compresses_and_evaluates_from_the_artifact(capsys, workdir, hf_dirs, family):
    """Finding 6: GPT-2 and Llama directories (no pad token) were written by compress, then evaluate died."""
    assert detect_hf_task(hf_dirs[family]) is TASKS[family]
    recipe = workdir / "int8.yaml"
    recipe.write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    code, out, err = run(capsys, "compress", "--model", f"hf:{hf_dirs[family]}", "--recipe", str(recipe),
                         "--out", "m.dsq", "--json")
    assert code == 0, err
    (workdir / "eval.txt").write_text("\n".join(f"Sentence number {i} of a small evaluation text." for i in range(24)))
    code, out, err = run(capsys, "evaluate", "m.dsq", "--data", "text:eval.txt", "--no-latency", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == TASKS[family].value
    quality = result[QUALITY[TASKS[family]]]
    assert quality == quality and quality > 0  # a number, not NaN
    assert result["artifact_bytes"] == (workdir / "m.dsq").stat().st_size
    assert result["params"] > 0 and result["fp32_bytes"] >= 4 * result["params"]


def test_sequence_classifier_keeps_its_head(hf_dirs):
    model = resolve_model(f"hf:{hf_dirs['bert-classifier']}", progress=False)
    assert model.module.labels == ["negative", "neutral", "positive"]
    logits = model.module.encode(["one sentence", "another one here"])
    assert logits.shape == (2, 3)
    data = TextData("s", ["a first sentence of text", "a second sentence", "and a third"])
    result = evaluate(model, data, model, latency=False)
    assert result["label_agreement"] == 1.0 and result["cosine_min"] == pytest.approx(1.0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(hf_dirs):
    """A causal LM whose logits are all equal predicts every token with 1/V: perplexity V exactly."""
    model = resolve_model(f"hf:{hf_dirs['gpt2']}", progress=False)
    lm = model.module
    with torch.no_grad():
        lm.transformer.lm_head.weight.zero_()  # tied with wte: zero both, all logits 0
    ppl, tokens = perplexity(lm, ["abc def ghi"] * 30, window=32, stride=16)
    assert ppl == pytest.approx(lm.transformer.config.vocab_size, rel=1e-5)
    assert tokens == len("\n".join(["abc def ghi"] * 30)) - 1  # bytes: every token but the first, once


def test_perplexity_windows_score_each_token_once(hf_dirs):
    lm = resolve_model(f"hf:{hf_dirs['llama']}", progress=False).module
    text = ["the quick brown fox jumps over the lazy dog"] * 6
    full, n = perplexity(lm, text, window=128, stride=127)
    windowed, m = perplexity(lm, text, window=64, stride=16)
    assert n == m == len("\n".join(text)) - 1
    assert windowed == pytest.approx(full, rel=0.5)  # same tokens, less context: close, not equal


def _fake_dir(tmp_path, config: dict, weights: str = "model.safetensors"):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / weights).write_bytes(b"\0" * 16)
    return folder


@pytest.mark.parametrize("config, weights, needle", [
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "model.safetensors", "'t5'"),
    ({"model_type": "llama", "auto_map": {"AutoModel": "modeling.X"}}, "model.safetensors", "custom code"),
    ({"model_type": "bert"}, "pytorch_model.bin", "pickle"),
])
def test_unsupported_directories_are_refused_before_any_work(capsys, workdir, tmp_path, config, weights, needle):
    folder = _fake_dir(tmp_path, config, weights)
    (workdir / "r.yaml").write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    line = one_line_error(*run(capsys, "compress", "--model", f"hf:{folder}", "--recipe", "r.yaml", "--out", "x.dsq"))
    assert needle in line
    assert not (workdir / "x.dsq").exists()
    with pytest.raises(ModelError):
        detect_hf_task(folder)


def test_compress_never_writes_an_artifact_that_cannot_run(capsys, workdir):
    """A forward that reads a replaced layer's weight works in fp32 and breaks once quantized: refused, no file."""
    (workdir / "r.yaml").write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    line = one_line_error(*run(capsys, "compress", "--model", "py:deepsqueeze.testing.hf_models:TiedAutoencoder",
                               "--recipe", "r.yaml", "--out", "x.dsq"))
    assert "fails on one batch" in line and "nothing was written" in line
    assert not (workdir / "x.dsq").exists()


def test_copied_directory_loads_without_the_original(tmp_path, hf_dirs):
    """The artifact records the config's task; the base rebuild reads only config and tokenizer files."""
    folder = shutil.copytree(hf_dirs["llama"], tmp_path / "copy")
    model = resolve_model(f"hf:{folder}", progress=False)
    assert model.base == {"kind": "hf", "path": str(folder.resolve()), "task": "causal-lm"}

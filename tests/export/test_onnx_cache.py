"""Causal LMs in ONNX with past key-values (Optimum's layout): ONNX Runtime's cached generation gives torch's
tokens, a scoring call runs with an empty past, and the CLI generates in ONNX Runtime."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from deepsqueeze.data.datasets import TextData
from deepsqueeze.export import export
from deepsqueeze.export.onnx import OrtModule
from deepsqueeze.prune import PruneTransformerConfig, prune_
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.cli import run
from deepsqueeze.testing.hf_models import make_hf_dir

PROMPT = "The quick brown fox jumps over"


def _text() -> TextData:
    return TextData("text:calib", [f"the {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog"] * 16)])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("stage", [None, {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16}])
def test_onnx_runtime_generates_torchs_tokens_with_the_cache(family, stage, tmp_path, float_activation_nbits):
    model = resolve_model(f"hf:{make_hf_dir(family, tmp_path / family)}", progress=False)
    if stage:
        run_stages(model, parse_recipe({"stages": [stage]}), _text(), progress=False)
    result = export(model, "onnx", tmp_path / "m.onnx")
    assert "greedy tokens equal" in result.check["cached_generation"]
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    layers = model.module.transformer.config.num_hidden_layers
    assert inputs[:2] == ["input_ids", "attention_mask"] and len(inputs) == 2 + 2 * layers
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[0] == "logits" and outputs[1:3] == ["present.0.key", "present.0.value"]
    ort = OrtModule(tmp_path / "m.onnx", model.module)
    ours = model.generate(PROMPT, max_new_tokens=10)
    theirs = ort.generate(PROMPT, max_new_tokens=10)
    assert theirs.token_ids == ours.token_ids and theirs.cache
    assert ort.generate(PROMPT, max_new_tokens=10, cache=False).token_ids == ours.token_ids
    inputs = model.module.tokenize(["a short one", "and a somewhat longer sentence"])
    with torch.no_grad():
        torch.testing.assert_close(ort(**inputs), model.module(**inputs), rtol=1e-4, atol=1e-4)


def test_a_decoder_with_a_block_removed_exports_its_smaller_cache(tmp_path):
    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l', num_hidden_layers=3)}", progress=False)
    prune_(model, PruneTransformerConfig(drop_layers=["transformer.model.layers.1"]))
    export(model, "onnx", tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert len(graph.graph.input) == 2 + 2 * 2
    assert OrtModule(tmp_path / "m.onnx", model.module).generate(PROMPT, max_new_tokens=6).token_ids == \
        model.generate(PROMPT, max_new_tokens=6).token_ids


def test_the_cli_generates_in_onnx_runtime(tmp_path, capsys):
    folder = make_hf_dir("llama", tmp_path / "l")
    code, out, err = run(capsys, "generate", f"hf:{folder}", "--prompt", PROMPT, "--max-new-tokens", "6",
                         "--backend", "ort", "--json")
    assert code == 0, err
    ort = json.loads(out)
    code, out, _ = run(capsys, "generate", f"hf:{folder}", "--prompt", PROMPT, "--max-new-tokens", "6", "--json")
    torch_run = json.loads(out)
    assert ort["backend"] == "ort" and ort["token_ids"] == torch_run["token_ids"]
    code, _, err = run(capsys, "generate", f"hf:{folder}", "--prompt", PROMPT, "--backend", "tpu")
    assert code == 2 and "unknown backend" in err


@pytest.mark.parametrize("near_tie, written", [(1.0, True), (0.0, False)])
def test_a_greedy_token_int8_activations_flip_is_accepted_only_at_a_near_tie(tmp_path, monkeypatch, near_tie,
                                                                             written):
    """MatMulNBits computes with int8 activations (accuracy level 4): ONNX Runtime's greedy tokens may leave
    torch's where torch's two best logits nearly tie. Such a flip is said in the check; any other is refused."""
    from deepsqueeze.errors import ModelError
    from deepsqueeze.export import onnx as onnx_export

    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    run_stages(model, parse_recipe({"stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16}]}),
               _text(), progress=False)
    real = OrtModule.generate

    def flipped(self, prompt, **kwargs):
        out = real(self, prompt, **kwargs)
        out.token_ids[0] = (out.token_ids[0] + 1) % 256  # another first token than torch's
        return out

    monkeypatch.setattr(OrtModule, "generate", flipped)
    monkeypatch.setattr(onnx_export, "NEAR_TIE", near_tie)
    if written:
        result = export(model, "onnx", tmp_path / "m.onnx")
        assert "near tie" in result.check["cached_generation"]
    else:
        with pytest.raises(ModelError, match="differs from torch's at new token 1"):
            export(model, "onnx", tmp_path / "m.onnx")
        assert not (tmp_path / "m.onnx").exists()

"""Hugging Face export (issue 12, finding 5): pruned, layer-dropped and distilled transformers leave the
.dsq as directories transformers and sentence-transformers load offline, with the .dsq's outputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import deepsqueeze  # noqa: E402
from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.export import export  # noqa: E402
from deepsqueeze.recipes import compress, parse_recipe  # noqa: E402
from deepsqueeze.testing.cli import run  # noqa: E402
from deepsqueeze.testing.hf_models import make_hf_dir  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog", "a b c", "pruned transformers still load elsewhere"]


def _pruned(tmp_path, family: str, drop: str, heads: int = 2):
    src = make_hf_dir(family, tmp_path / family)
    recipe = parse_recipe({"description": "test", "stages": [
        {"type": "prune_transformer", "heads": heads, "ffn_ratio": 0.25, "drop_layers": [drop]}]})
    out = tmp_path / f"{family}.dsq"
    compress(f"hf:{src}", recipe, out, "pydoc-sentences:calib", progress=False, evaluate_result=False)
    return src, out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_pruned_bert_encoder_loads_with_automodel_and_sentence_transformers(tmp_path):
    from transformers import AutoModel

    src, dsq = _pruned(tmp_path, "bert", "transformer.encoder.layer.1")
    model = deepsqueeze.load(dsq)
    result = export(model, "hf", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 48
    assert {"modules.json", "sentence_bert_config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    tokens = model.module.tokenize(TEXT)
    reloaded = AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        ours = model.module.transformer(**tokens).last_hidden_state
        theirs = reloaded(**tokens).last_hidden_state
    assert _max_diff(ours, theirs) < 1e-5
    st = pytest.importorskip("sentence_transformers")
    embeddings = st.SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(TEXT, convert_to_tensor=True)
    assert _max_diff(model.module.encode(TEXT), embeddings.cpu()) < 1e-5
    assert result.check["worst_cosine_distance"] <= 1e-4 and result.check["notes"]


def test_gqa_llama_keeps_its_smaller_heads_in_the_config(tmp_path):
    from transformers import AutoModelForCausalLM

    src, dsq = _pruned(tmp_path, "llama", "transformer.model.layers.1")
    model = deepsqueeze.load(dsq)
    export(model, "hf", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert config["num_attention_heads"] == original["num_attention_heads"] - 2
    assert config["head_dim"] == original["hidden_size"] // original["num_attention_heads"]
    assert config["num_hidden_layers"] == original["num_hidden_layers"] - 1
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.module(ids, mask)
        theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(ids, attention_mask=mask).logits
    assert _max_diff(ours, theirs) < 1e-4


def test_layers_of_different_ffn_widths_are_zero_padded_exactly(tmp_path):
    from transformers import AutoModel

    src = make_hf_dir("bert", tmp_path / "bert")
    model = deepsqueeze.resolve_model(f"hf:{src}", progress=False)
    layer = model.module.transformer.encoder.layer[0]
    keep = torch.arange(40)
    inter, out = layer.intermediate.dense, layer.output.dense
    small_in, small_out = nn.Linear(inter.in_features, 40), nn.Linear(40, out.out_features)
    small_in.weight.data, small_in.bias.data = inter.weight.data[keep].clone(), inter.bias.data[keep].clone()
    small_out.weight.data, small_out.bias.data = out.weight.data[:, keep].clone(), out.bias.data.clone()
    layer.intermediate.dense, layer.output.dense = small_in, small_out
    result = export(model, "hf", tmp_path / "out")
    assert any("zero-padded" in note for note in result.check["notes"])
    tokens = model.module.tokenize(TEXT)
    with torch.no_grad():
        theirs = AutoModel.from_pretrained(str(tmp_path / "out")).eval()(**tokens).last_hidden_state
        ours = model.module.transformer(**tokens).last_hidden_state
    assert _max_diff(ours, theirs) < 1e-5


def test_quantized_models_are_refused_in_one_line_and_nothing_is_left(tmp_path, capsys):
    src = make_hf_dir("gpt2", tmp_path / "gpt2")
    dsq = tmp_path / "q.dsq"
    compress(f"hf:{src}", parse_recipe({"description": "q", "stages": [{"type": "quantize", "method": "dynamic"}]}),
             dsq, progress=False, evaluate_result=False)
    with pytest.raises(ModelError, match="use --format onnx"):
        export(deepsqueeze.load(dsq), "hf", tmp_path / "out")
    capsys.readouterr()  # what building the directory printed
    code, out, err = run(capsys, "export", str(dsq), "--format", "hf", "--out", str(tmp_path / "out"))
    assert code == 2 and "--format onnx" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_exports_onnx_and_hf_and_prints_one_json_object(tmp_path, capsys):
    src, dsq = _pruned(tmp_path, "gpt2", "transformer.transformer.h.1")
    for fmt, out in (("hf", tmp_path / "hf"), ("onnx", tmp_path / "m.onnx")):
        code, stdout, err = run(capsys, "export", str(dsq), "--format", fmt, "--out", str(out), "--json")
        assert code == 0, err
        payload = json.loads(stdout)
        assert payload["format"] == fmt and payload["bytes"] > 0 and out.exists()


def test_force_never_replaces_the_input_or_a_folder_that_is_not_an_export(tmp_path, capsys, monkeypatch):
    """Found by trying to break export: --force replaced the input hf:DIR, a folder holding the input .dsq,
    and any folder with a config.json."""
    src = make_hf_dir("bert", tmp_path / "bert")
    before = sorted(p.name for p in src.iterdir())
    capsys.readouterr()
    code, _, err = run(capsys, "export", f"hf:{src}", "--format", "hf", "--out", str(src), "--force")
    assert code == 2 and "input" in err and sorted(p.name for p in src.iterdir()) == before
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "config.json").write_text("{}")
    (holder / "important.txt").write_text("precious")
    code, _, err = run(capsys, "export", f"hf:{src}", "--format", "hf", "--out", str(holder), "--force")
    assert code == 2 and "not one" in err and (holder / "important.txt").read_text() == "precious"
    code, _, err = run(capsys, "export", f"hf:{src}", "--format", "hf", "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run(capsys, "export", f"hf:{src}", "--format", "hf", "--out", str(tmp_path / "a"), "--force")
    assert code == 0, err  # an earlier export is replaced
    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run(capsys, "export", f"hf:{src}", "--format", "hf", "--out", ".", "--force")
    assert code == 2 and "current folder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model,data", [("zoo:lenet300@digits", "pydoc-sentences:calib"), ("text", "digits")])
def test_data_that_does_not_fit_the_model_is_one_line(tmp_path, capsys, model, data, lenet300_digits):
    if model == "text":
        model = f"hf:{make_hf_dir('bert', tmp_path / 'bert')}"
    capsys.readouterr()
    code, _, err = run(capsys, "export", model, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--data", data)
    assert code == 2 and "does not fit" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_out_folder_the_system_refuses_is_one_line(tmp_path, capsys, lenet300_digits):
    code, _, err = run(capsys, "export", "zoo:lenet300@digits", "--format", "onnx", "--out", "/proc/a.onnx")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1

"""sentence-transformers directories through ``hf:DIR`` (issue 24, finding 1): every module in modules.json
runs as ``SentenceTransformer(dir).encode`` runs it, its weights are part of the model (stages, coverage,
artifacts, exports), and a module or setting deepsqueeze does not run is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

import deepsqueeze  # noqa: E402
from deepsqueeze.artifact import save  # noqa: E402
from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.export import export  # noqa: E402
from deepsqueeze.recipes import compress, parse_recipe  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.testing.cli import run  # noqa: E402
from deepsqueeze.testing.hf_models import make_st_dir  # noqa: E402
from deepsqueeze.zoo.hf import detect_hf_task  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "a b c", "Short",
             "A much longer sentence that goes on and on, with many words, so the others in the batch are padded.",
             "truncated " * 200]  # longer than the models' 128 positions: cut where sentence-transformers cuts


def _st_encode(folder) -> torch.Tensor:
    return st.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True).cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return make_st_dir(tmp_path_factory.mktemp("st") / "dense", "bert", "mean", ("dense:16",))


def test_a_dense_module_gives_the_embeddings_sentence_transformers_gives(dense_dir):
    """Finding 1: Transformer, Pooling, Dense 32->16: deepsqueeze gave the 32-d pooled embeddings."""
    model = resolve_model(f"hf:{dense_dir}", progress=False)
    want = _st_encode(dense_dir)
    assert want.shape == (len(SENTENCES), 16)
    assert _max_diff(model.module.encode(SENTENCES), want) < 1e-5
    assert isinstance(model.module.get_submodule("head.0.linear"), nn.Linear)  # a layer stages can compress


@pytest.mark.parametrize("family, pooling, head", [
    ("bert", "cls", ("normalize",)),
    ("bert", "max", ("dense:24:Identity",)),
    ("roberta", "mean_sqrt_len_tokens", ("dense:16", "layernorm", "normalize")),
    ("distilbert", "weightedmean", ("layernorm",)),
    ("albert", ("cls", "mean"), ("dense:20:ReLU", "normalize")),
    ("bert", ("mean", "max"), ("dense:12:GELU", "dense:8")),
    ("qwen2", "lasttoken", ("normalize",)),
    ("gpt2", "weightedmean", ("dense:8:Sigmoid",)),
])
def test_every_module_combination_matches_sentence_transformers(tmp_path, family, pooling, head):
    folder = make_st_dir(tmp_path / "st", family, pooling, head)
    want = _st_encode(folder)
    first = resolve_model(f"hf:{folder}", progress=False).module.encode(SENTENCES)
    again = resolve_model(f"hf:{folder}", progress=False).module.encode(SENTENCES)
    assert _max_diff(first, want) < 1e-5
    assert torch.equal(first, again)  # nothing initialised at random


def test_dense_weights_go_through_stages_artifacts_and_exports(tmp_path, dense_dir):
    model = resolve_model(f"hf:{dense_dir}", progress=False)
    want = _st_encode(dense_dir)
    save(model, tmp_path / "float.dsq")
    assert _max_diff(deepsqueeze.load(tmp_path / "float.dsq").module.encode(SENTENCES), want) < 1e-5

    recipe = parse_recipe({"description": "q", "stages": [{"type": "quantize", "method": "dynamic"}]})
    compress(f"hf:{dense_dir}", recipe, tmp_path / "q.dsq", progress=False, evaluate_result=False)
    manifest = deepsqueeze.load(tmp_path / "q.dsq").meta["manifest"]
    assert any(entry["module"] == "head.0.linear" for entry in manifest["coverage"])

    export(model, "hf", tmp_path / "hf")
    assert _max_diff(_st_encode(tmp_path / "hf"), want) < 1e-5
    assert _max_diff(resolve_model(f"hf:{tmp_path / 'hf'}", progress=False).module.encode(SENTENCES), want) < 1e-5

    pytest.importorskip("onnxruntime")
    from deepsqueeze.export.onnx import OrtModule

    export(model, "onnx", tmp_path / "m.onnx")
    tokens = model.module.tokenize(SENTENCES)
    ours = OrtModule(tmp_path / "m.onnx", model.module, 1)(tokens["input_ids"], tokens["attention_mask"])
    assert ours.shape == (len(SENTENCES), 16)
    assert _max_diff(ours, want) < 1e-4


@pytest.mark.parametrize("family, pooling, head", [
    ("bert", "cls", ("dense:16", "layernorm", "normalize")),
    ("bert", ("mean", "cls"), ("dense:8:Identity",)),  # an order the legacy pooling keys cannot express
    ("qwen2", "lasttoken", ("normalize",)),
])
def test_an_export_keeps_every_module(tmp_path, family, pooling, head):
    folder = make_st_dir(tmp_path / "st", family, pooling, head)
    model = resolve_model(f"hf:{folder}", progress=False)
    export(model, "hf", tmp_path / "hf")
    assert _max_diff(_st_encode(tmp_path / "hf"), _st_encode(folder)) < 1e-5


def _edit(folder, file, change):
    path = folder / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(change(data) or data))


def _pickle_only(folder):
    (folder / "2_Dense" / "model.safetensors").unlink()
    (folder / "2_Dense" / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")


def _reshaped(folder):
    from safetensors.torch import save_file

    save_file({"linear.weight": torch.zeros(16, 31), "linear.bias": torch.zeros(16)},
              str(folder / "2_Dense" / "model.safetensors"))


def _extra_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "2_Dense" / "model.safetensors"))
    save_file({**state, "scale": torch.ones(16)}, str(folder / "2_Dense" / "model.safetensors"))


@pytest.mark.parametrize("change, needle", [
    (lambda f: _edit(f, "modules.json", lambda m: m.append(
        {"idx": 3, "name": "3", "path": "3_W", "type": "sentence_transformers.models.WeightedLayerPooling"})),
     "WeightedLayerPooling"),
    (lambda f: _edit(f, "modules.json", lambda m: m.__setitem__(2, {**m[2], "type": "my_package.layers.Dense"})),
     "my_package.layers.Dense"),
    (_pickle_only, "pickle"),
    (lambda f: (f / "2_Dense" / "model.safetensors").unlink(), "no model.safetensors"),
    (_reshaped, "shape"),
    (_extra_tensor, "'scale'"),
    (lambda f: _edit(f, "2_Dense/config.json", lambda c: c.update(activation_function="my.pkg.Swish")), "my.pkg.Swish"),
    (lambda f: _edit(f, "2_Dense/config.json", lambda c: c.update(init_scale=2)), "init_scale"),
    (lambda f: _edit(f, "1_Pooling/config.json", lambda c: c.update(pooling_mode="median")), "median"),
    (lambda f: _edit(f, "config_sentence_transformers.json", lambda c: c.update(
        prompts={"query": "query: "}, default_prompt_name="query")), "prompt"),
    (lambda f: _edit(f, "sentence_bert_config.json", lambda c: c.update(do_lower_case=True)), "do_lower_case"),
    (lambda f: _edit(f, "2_Dense/config.json", lambda c: c.update(in_features=64)), "64"),
])
def test_what_deepsqueeze_does_not_run_is_refused_in_one_line(capsys, workdir, dense_dir, change, needle):
    folder = shutil.copytree(dense_dir, workdir / "st")
    change(folder)
    (workdir / "r.yaml").write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    capsys.readouterr()
    code, _, err = run(capsys, "compress", "--model", f"hf:{folder}", "--recipe", "r.yaml", "--out", "x.dsq")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (workdir / "x.dsq").exists()
    with pytest.raises(ModelError):
        resolve_model(f"hf:{folder}", progress=False)


def test_module_configs_are_checked_before_any_weight_is_read(tmp_path, dense_dir):
    folder = shutil.copytree(dense_dir, tmp_path / "st")
    _edit(folder, "modules.json", lambda m: m.append(
        {"idx": 3, "name": "3", "path": "3_CNN", "type": "sentence_transformers.models.CNN"}))
    with pytest.raises(ModelError, match="CNN"):
        detect_hf_task(folder)


def test_compress_stream_reads_the_head_from_its_module_folders(tmp_path, dense_dir):
    from deepsqueeze.recipes.stream import compress_streaming

    recipe = parse_recipe({"description": "s", "stages": [
        {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16, "calibration_samples": 8}]})
    compress(f"hf:{dense_dir}", recipe, tmp_path / "memory.dsq", "pydoc-sentences:calib", progress=False,
             evaluate_result=False)
    compress_streaming(f"hf:{dense_dir}", recipe, tmp_path / "stream.dsq", "pydoc-sentences:calib", progress=False)
    memory, streamed = deepsqueeze.load(tmp_path / "memory.dsq").module, deepsqueeze.load(tmp_path / "stream.dsq").module
    assert "head.0.linear.codes" in streamed.state_dict()  # the Dense layer was quantized with the rest
    assert torch.equal(memory.encode(SENTENCES), streamed.encode(SENTENCES))

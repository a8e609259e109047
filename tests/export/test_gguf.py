"""GGUF export: a causal LM as one file llama.cpp runs, codes carried onto its block types, verified in llama.cpp
(where llama-cpp-python is installed) or transformers' GGUF reader before it is reported; refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import ModelError
from deepsqueeze.export import export
from deepsqueeze.export import gguf as gguf_export
from deepsqueeze.prune import PruneTransformerConfig, prune_
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.cli import run
from deepsqueeze.testing.gguf_models import make_gguf
from deepsqueeze.testing.hf_models import make_hf_dir

gguf = pytest.importorskip("gguf")
RUNTIMES = ["transformers", pytest.param("llama.cpp", marks=pytest.mark.skipif(
    gguf_export.gguf_runtime() != "llama.cpp", reason="llama-cpp-python is not installed (pip builds llama.cpp from "
                                                      "source: minutes on 2 cores, left to the benchmarks)"))]


def _text() -> TextData:
    words = "the cat sat on a mat while the dog ran in the park and the bird sang over the tree".split()
    g = torch.Generator().manual_seed(0)
    return TextData("text:calib", [" ".join(words[int(i)] for i in torch.randint(len(words), (24,), generator=g))
                                   for _ in range(32)])


def _quantized(family: str, folder, stage: dict | None):
    model = resolve_model(f"hf:{make_hf_dir(family, folder)}", progress=False)
    if stage:
        run_stages(model, parse_recipe({"stages": [stage]}), _text(), progress=False)
    return model


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


RECIPES = {
    "fp32": (None, {"F32"}),
    "w4-asym": ({"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}, {"Q4_1"}),
    "w4-sym-embed8": ({"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": True,
                       "embedding_bits": 8}, {"Q4_0", "Q8_0"}),
    "w3-gptq-float-zero": ({"type": "quantize", "method": "gptq", "bits": 3, "group_size": 64, "symmetric": False,
                            "zero_point": "float", "calibration_samples": 8}, {"Q4_1"}),
    "w5-sym": ({"type": "quantize", "method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}, {"Q5_0"}),
    "w5-asym": ({"type": "quantize", "method": "rtn", "bits": 5, "group_size": 32, "symmetric": False}, {"Q5_1"}),
    "int8": ({"type": "quantize", "method": "dynamic"}, {"Q8_0"}),
}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_file_runs_like_the_torch_model(recipe, family, runtime, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "gguf_runtime", lambda: runtime)
    stage, kinds = RECIPES[recipe]
    model = _quantized(family, tmp_path / family, stage)
    result = export(model, "gguf", tmp_path / "m.gguf")
    check = result.check
    assert check["worst_cosine_distance"] <= check["tolerance"] and check["top1_agreement"] >= 0.97
    assert check["tolerance"] == (gguf_export.TOLERANCE_GGUF if recipe != "int8" else 2e-2)
    assert ("llama.cpp" in check["runtime"]) is (runtime == "llama.cpp") and ("llama_cpp" in check) is (
        runtime == "llama.cpp")
    if runtime == "llama.cpp":
        assert check["llama_cpp"]["worst_cosine_distance"] <= gguf_export.TOLERANCE_LLAMA_CPP
    types = _types(tmp_path / "m.gguf")
    matrices = {t for name, t in types.items() if name.endswith(".weight") and "norm" not in name}
    assert kinds <= matrices, (kinds, matrices)
    assert all(layer["exact"] == "true" for layer in result.layers if layer["tensor"] != "token_embd.weight")
    tied = family == "qwen2"  # the tiny Qwen2 ties its head to the embedding; the tiny Llama does not
    assert ("output.weight" in types) is not tied


def test_the_rotary_rows_are_llama_cpps_order():
    rows = gguf_export._rotary_rows(8, 2)  # two heads of 4: halves (0,1 | 2,3) interleaved
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_sizes_come_from_the_pruned_model_and_uneven_blocks_are_refused(tmp_path):
    model = _quantized("llama", tmp_path / "l", None)
    prune_(model, PruneTransformerConfig(drop_layers=["transformer.model.layers.0"]))
    export(model, "gguf", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["llama.block_count"].contents() == 1
    assert not any(t.name.startswith("blk.1.") for t in reader.tensors)
    uneven = _quantized("llama", tmp_path / "u", None)
    layer = uneven.module.transformer.model.layers[0].mlp
    layer.up_proj = torch.nn.Linear(64, 48, bias=False)
    layer.gate_proj = torch.nn.Linear(64, 48, bias=False)
    layer.down_proj = torch.nn.Linear(48, 64, bias=False)
    with pytest.raises(ModelError, match="differ in ffn"):
        export(uneven, "gguf", tmp_path / "u.gguf")
    assert not (tmp_path / "u.gguf").exists()


def test_a_model_read_from_gguf_keeps_its_tokenizer_field_by_field(tmp_path):
    source = make_gguf(tmp_path / "src.gguf")
    model = resolve_model(f"gguf:{source}", progress=False)
    export(model, "gguf", tmp_path / "out.gguf")
    a, b = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(tmp_path / "out.gguf"))
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert keys and all(a.fields[k].contents() == b.fields[k].contents() for k in keys)
    src, out = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(src) == set(out)
    for name in src:  # float32 carried exactly, query and key rows back in llama.cpp's rotary order
        assert np.array_equal(np.asarray(out[name].data), np.asarray(src[name].data)), name


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_families_llama_cpp_has_no_graph_for_here_are_refused(family, tmp_path):
    model = resolve_model(f"hf:{make_hf_dir(family, tmp_path / family)}", progress=False)
    with pytest.raises(ModelError, match="GGUF export takes causal LMs"):
        export(model, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".m.gguf*")) == []


def test_the_cli_writes_reports_and_replaces_only_its_own_files(tmp_path, capsys):
    folder = make_hf_dir("qwen2", tmp_path / "q")
    out = tmp_path / "q.gguf"
    code, stdout, err = run(capsys, "export", f"hf:{folder}", "--format", "gguf", "--out", str(out), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["format"] == "gguf" and report["bytes"] == out.stat().st_size and report["check"]["prompts"] > 0
    code, _, err = run(capsys, "export", f"hf:{folder}", "--format", "gguf", "--out", str(out))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "export", f"hf:{folder}", "--format", "gguf", "--out", str(out), "--force")
    assert code == 0, err
    foreign = make_gguf(tmp_path / "theirs.gguf")
    before = foreign.read_bytes()
    code, _, err = run(capsys, "export", f"hf:{folder}", "--format", "gguf", "--out", str(foreign), "--force")
    assert code == 2 and "not one" in err and foreign.read_bytes() == before
    code, _, err = run(capsys, "export", f"hf:{folder}", "--format", "gguf", "--out", str(tmp_path / "x.bin"))
    assert code == 2 and ".gguf file" in err and len(err.strip().splitlines()) == 1

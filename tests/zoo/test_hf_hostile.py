"""Hostile ``hf:DIR`` folders found by the fuzzer (tests/fuzz/test_hf.py, issue 25 round three): each ends in one
``ModelError`` at load, never in a read outside the folder, a model that fails or computes NaN in its forward
pass, a hang or a memory blow-up."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.testing.hf_models import make_hf_dir  # noqa: E402


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-hostile")
    bert = make_hf_dir("bert", root / "bert")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (bert / "modules.json").write_text(json.dumps(modules))
    (bert / "1_Pooling").mkdir()
    (bert / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False}))
    (bert / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return {"bert": bert, "gpt2": make_hf_dir("gpt2", root / "gpt2"),
            "bert-classifier": make_hf_dir("bert-classifier", root / "bert-classifier")}


def _copy(seeds: dict[str, Path], family: str, dst: Path) -> Path:
    shutil.copytree(seeds[family], dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_the_loaded_seed_runs(seeds):
    model = resolve_model(f"hf:{seeds['bert']}", progress=False)
    assert model.module.max_seq_length == 64
    assert model.module(**model.module.tokenize(["a sentence"])).shape == (1, 32)


@pytest.mark.parametrize("path", ["{other}", "../other", "1_Pooling/../../other"])
def test_modules_json_never_names_a_folder_outside_the_model(seeds, tmp_path, path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    folder = _copy(seeds, "bert", tmp_path / "model")
    _edit_json(folder / "modules.json", lambda m: m[1].update(path=path.format(other=other)))
    opened: list[str] = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], str) and args[0].startswith(str(other)):
            opened.append(args[0])

    sys.addaudithook(hook)
    with pytest.raises(ModelError, match="outside the model folder|not a folder of"):
        resolve_model(f"hf:{folder}", progress=False)
    assert not [p for p in opened if os.path.abspath(p).startswith(str(other))]


@pytest.mark.parametrize("value", [10**30, -1, 0, "128", True, 1.5])  # null: the tokenizer's limit, as in sentence-transformers
def test_max_seq_length_is_a_bounded_integer(seeds, tmp_path, value):
    folder = _copy(seeds, "bert", tmp_path / "model")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": value}))
    with pytest.raises(ModelError, match="max_seq_length"):
        resolve_model(f"hf:{folder}", progress=False)


@pytest.mark.parametrize("modules", ['{"type": "Pooling"}', "[1, 2]", '[{"type": 5, "path": ""}]', "[" * 10_000])
def test_malformed_modules_json_is_one_model_error(seeds, tmp_path, modules):
    folder = _copy(seeds, "bert", tmp_path / "model")
    (folder / "modules.json").write_text(modules)
    with pytest.raises(ModelError, match="modules.json"):
        resolve_model(f"hf:{folder}", progress=False)


@pytest.mark.parametrize("family, key, value, needle", [
    ("bert-classifier", "num_hidden_layers", 65_537, "layers"),  # took minutes to build
    ("gpt2", "n_layer", 10**20, "layers"),
    ("gpt2", "n_inner", 10**6, "parameters"),  # built 130M parameters (+500 MB) before transformers refused
    ("gpt2", "vocab_size", 10**9, "parameters"),  # 128 GB
    ("bert-classifier", "max_position_embeddings", 10**7, "parameters"),
])
def test_a_config_far_larger_than_its_weights_is_refused_before_it_is_built(seeds, tmp_path, family, key, value,
                                                                             needle):
    folder = _copy(seeds, family, tmp_path / "model")
    _edit_json(folder / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(ModelError, match=f"{needle}.*does not belong to these weights"):
        resolve_model(f"hf:{folder}", progress=False)


@pytest.mark.parametrize("header", [b"\xff" * 8, (10**6).to_bytes(8, "little") + b"{", (2).to_bytes(8, "little") + b"[]"])
def test_a_safetensors_header_that_is_not_one_is_a_model_error(seeds, tmp_path, header):
    folder = _copy(seeds, "gpt2", tmp_path / "model")
    (folder / "model.safetensors").write_bytes(header)
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(f"hf:{folder}", progress=False)


def _tokenizer_edit(edit):
    def apply(folder: Path) -> None:
        _edit_json(folder / "tokenizer.json", edit)
    return apply


def _plant_float_max(folder: Path) -> None:
    import struct

    data = bytearray((folder / "model.safetensors").read_bytes())
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    start = header["embeddings.word_embeddings.weight"]["data_offsets"][0]
    row = 4 * 32 * 1000  # a row of a token no probe sentence holds
    data[8 + length + start + row : 8 + length + start + row + 4] = struct.pack("<f", 3.4028e38)
    (folder / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("family, edit, needle", [
    ("bert", _tokenizer_edit(lambda t: t["model"]["vocab"].update({"every": 10**6})), "does not"),
    # a token no probe sentence holds: found by the fuzzer once the probe was in place (IndexError at "jumps")
    ("gpt2", _tokenizer_edit(lambda t: t["model"]["vocab"].update({"j": 2**31})), "embedding table"),
    ("bert", _tokenizer_edit(lambda t: t["model"]["vocab"].update({"zebra": 10**6})), "embedding table"),
    ("bert", _tokenizer_edit(lambda t: t["model"]["vocab"].pop("[UNK]")), "does not run"),
    ("bert", lambda f: _edit_json(f / "config.json", lambda c: c.update(layer_norm_eps=-1.0)), "NaN or Inf"),
    ("bert-classifier", lambda f: _edit_json(f / "tokenizer_config.json", lambda c: c.update(
        model_input_names=["input_ids"])), "does not run"),
    ("bert", _plant_float_max, "beyond"),
])
def test_files_that_do_not_fit_together_are_refused_at_load(seeds, tmp_path, family, edit, needle):
    """Found by the fuzzer: each of these loaded, then failed (IndexError, no [UNK], no attention mask) or computed
    NaN or Inf at the first sentence holding the edited token."""
    folder = _copy(seeds, family, tmp_path / "model")
    edit(folder)
    with pytest.raises(ModelError, match=needle):
        resolve_model(f"hf:{folder}", progress=False)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(id2label={str(i): f"L{i}" for i in range(100_000)}), "labels"),  # took over 10 s
    (lambda c: c.update(x=json.loads("[" * 100 + "]" * 100)), "nesting"),
    (lambda c: c.update(x="y" * (5 << 20)), "bytes"),
])
def test_config_json_is_bounded(seeds, tmp_path, edit, needle):
    folder = _copy(seeds, "gpt2", tmp_path / "model")
    _edit_json(folder / "config.json", edit)
    with pytest.raises(ModelError, match=needle):
        resolve_model(f"hf:{folder}", progress=False)


@pytest.mark.parametrize("key, value", [("architectures", True), ("architectures", 5), ("architectures", [1]),
                                        ("id2label", 7), ("model_type", ["bert"])])
def test_config_fields_of_the_wrong_type_are_one_model_error(seeds, tmp_path, key, value):
    """Found by the fuzzer: ``architectures: true`` raised TypeError ('bool' object is not iterable)."""
    folder = _copy(seeds, "bert-classifier", tmp_path / "model")
    _edit_json(folder / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(ModelError, match="config"):
        resolve_model(f"hf:{folder}", progress=False)

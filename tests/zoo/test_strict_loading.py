"""Strict loading (issue 24, finding 2): every tensor in the files is used and every weight of the model comes
from them, for ``hf:DIR``, ``py:`` with ``--weights`` and the packaged models; transformers' load report is
deepsqueeze's check, and its log is never silenced."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file, save_model  # noqa: E402

from deepsqueeze.core.model import load_state_checked  # noqa: E402
from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.testing.cli import run  # noqa: E402
from deepsqueeze.testing.hf_models import FAMILIES, byte_tokenizer, make_hf_dir  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog", "a b c"]


def _outputs(ref: str) -> torch.Tensor:
    module = resolve_model(ref, progress=False).module
    with torch.no_grad():
        return module(**module.tokenize(TEXT))


def _base_llama(folder, tie: bool):
    """``AutoModel.from_config(LlamaConfig(...)).save_pretrained(dir)``: the base model, no LM head."""
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                      bos_token_id=256, eos_token_id=256, tie_word_embeddings=tie)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    return {family: make_hf_dir(family, root / family) for family in FAMILIES}


def test_a_decoder_saved_without_its_head_is_refused(capsys, workdir):
    """Finding 2: loaded as causal-lm with a head drawn at random at every load (two loads: 0.85 apart)."""
    folder = _base_llama(workdir / "base", tie=False)
    with pytest.raises(ModelError, match=r"no weight for lm_head\.weight \(transformers would initialise it at random"):
        resolve_model(f"hf:{folder}", progress=False)
    capsys.readouterr()
    line = one_line(*run(capsys, "inspect", f"hf:{folder}")[::2])
    assert "lm_head.weight" in line and "save" in line


def test_a_tied_head_is_legitimately_absent_from_the_files(tmp_path, hf_dirs):
    folder = _base_llama(tmp_path / "tied", tie=True)
    module = resolve_model(f"hf:{folder}", progress=False).module
    assert module.transformer.lm_head.weight is module.transformer.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(str(hf_dirs["gpt2"] / "model.safetensors"))
    resolve_model(f"hf:{hf_dirs['gpt2']}", progress=False)  # GPT-2 ties its head too


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_loads_of_a_directory_give_identical_outputs(hf_dirs, family):
    ref = f"hf:{hf_dirs[family]}"
    assert torch.equal(_outputs(ref), _outputs(ref))


def _rewrite(folder, change):
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family, change, needle", [
    ("bert", lambda f: _rewrite(f, lambda s: s.update({"classifier.weight": torch.zeros(3, 32)})),
     "holds tensor classifier.weight"),
    ("bert", lambda f: _rewrite(f, lambda s: s.pop("encoder.layer.1.output.dense.weight")),
     "no weight for encoder.layer.1.output.dense.weight"),
    ("bert", lambda f: _rewrite(f, lambda s: s.pop("pooler.dense.weight")), "no weight for pooler.dense.weight"),
    ("bert-classifier", lambda f: _rewrite(f, lambda s: s.pop("classifier.weight")), "no weight for classifier.weight"),
    ("llama", lambda f: _config(f, intermediate_size=128), "does not fit the weights"),
    ("bert", lambda f: _config(f, architectures=["BertForMaskedLM"]), "BertForMaskedLM"),
    ("gpt2", lambda f: _config(f, architectures=["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
    ("bert-classifier", lambda f: _config(f, id2label={"0": "score"}, label2id={"score": 0}), "1 label"),
    ("gpt2", lambda f: _rewrite(f, lambda s: s.update({"lm_head.weight": torch.randn(257, 32)})),
     "tie_word_embeddings"),
])
def test_files_that_do_not_fit_the_model_are_refused_before_any_work(capsys, workdir, hf_dirs, family, change,
                                                                      needle):
    folder = shutil.copytree(hf_dirs[family], workdir / "m")
    change(folder)
    with pytest.raises(ModelError) as info:
        resolve_model(f"hf:{folder}", progress=False)
    assert needle in str(info.value)
    (workdir / "r.yaml").write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    capsys.readouterr()
    code, _, err = run(capsys, "compress", "--model", f"hf:{folder}", "--recipe", "r.yaml", "--out", "x.dsq")
    assert needle in one_line(code, err)
    assert not (workdir / "x.dsq").exists()


def test_transformers_logging_is_never_lowered(tmp_path):
    """deepsqueeze set transformers' verbosity to errors only, which hid the missing-weight report; what
    transformers logs during an accepted load now reaches its handlers."""
    folder = make_hf_dir("gpt2", tmp_path / "g")
    _config(folder, bos_token_id=99173)  # transformers warns (once per message) about this config
    logger = logging.getLogger("transformers")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    before = transformers.logging.get_verbosity()
    try:
        resolve_model(f"hf:{folder}", progress=False)
    finally:
        logger.removeHandler(handler)
    assert transformers.logging.get_verbosity() == before
    assert any("bos_token_id" in message for message in seen), seen


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("fc2.bias"), "missing ['fc2.bias']"),
    (lambda s: s.update({"fc4.weight": torch.zeros(1)}), "unexpected ['fc4.weight']"),
    (lambda s: s.update({"fc1.weight": torch.zeros(32, 15)}), "fc1.weight has shape [32, 15]"),
])
def test_py_weights_are_loaded_strictly(tmp_path, edit, needle):
    from deepsqueeze.testing.models import TinyMLP

    state = TinyMLP().state_dict()
    edit(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError) as info:
        resolve_model("py:deepsqueeze.testing.models:TinyMLP", weights=str(tmp_path / "w.safetensors"))
    assert needle in str(info.value)


def test_a_tied_weight_may_be_stored_once_but_never_twice_differently(tmp_path):
    source = _TiedLM()
    save_model(source, str(tmp_path / "w.safetensors"))  # safetensors keeps one name of the tied tensor
    target = _TiedLM()
    load_state_checked(target, load_file(str(tmp_path / "w.safetensors")), "w")
    assert torch.equal(target.head.weight, source.embed.weight) and target.head.weight is target.embed.weight
    twice = {"embed.weight": torch.zeros(10, 4), "head.weight": torch.ones(10, 4)}
    with pytest.raises(ModelError, match="two different values"):
        load_state_checked(_TiedLM(), twice, "w")


def test_a_cached_gpt_tiny_checkpoint_is_loaded_strictly(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(tmp_path))
    from deepsqueeze.zoo.gpt import build_gpt_tiny, checkpoint_path, pretrained_gpt_tiny

    state = {k: v.contiguous() for k, v in build_gpt_tiny().state_dict().items() if k != "transformer.lm_head.weight"}
    checkpoint_path().parent.mkdir(parents=True)
    save_file(state, str(checkpoint_path()))
    assert torch.equal(pretrained_gpt_tiny(progress=False).module.transformer.lm_head.weight,
                       state["transformer.transformer.wte.weight"])
    state.pop("transformer.transformer.h.0.ln_1.weight")
    save_file(state, str(checkpoint_path()))
    with pytest.raises(ModelError, match="h.0.ln_1.weight.*delete it to retrain"):
        pretrained_gpt_tiny(progress=False)


@pytest.mark.parametrize("change, needle", [
    (lambda shard, index: shard.pop("model.layers.1.mlp.up_proj.weight"), "no weight for transformer.model.layers.1"),
    (lambda shard, index: shard.update({"model.extra.weight": torch.zeros(2)}), "holds tensor model.extra.weight"),
    (lambda shard, index: shard.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}), "of shape [3, 64]"),
])
def test_compress_stream_loads_shards_strictly_before_any_work(tmp_path, change, needle):
    from deepsqueeze.recipes import parse_recipe
    from deepsqueeze.recipes.stream import compress_streaming
    from deepsqueeze.testing.big_models import llama_config, write_random_llama

    folder = tmp_path / "llama"
    write_random_llama(folder, llama_config(hidden=64, layers=2, intermediate=128), shard_bytes=60_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    file = folder / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    shard = load_file(str(file))
    change(shard, index)
    save_file(shard, str(file), metadata={"format": "pt"})
    index["weight_map"] = {name: file.name for name in shard} | {
        k: v for k, v in index["weight_map"].items() if v != file.name}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = parse_recipe({"description": "s", "stages": [{"type": "quantize", "method": "rtn", "bits": 4}]})
    with pytest.raises(ModelError) as info:
        compress_streaming(f"hf:{folder}", recipe, tmp_path / "x.dsq", "pydoc-sentences:calib", progress=False)
    assert needle in str(info.value)
    assert not (tmp_path / "x.dsq").exists()


def test_compress_stream_keeps_an_equal_tied_copy_tied_and_refuses_a_different_one(tmp_path, hf_dirs):
    from deepsqueeze.recipes import parse_recipe
    from deepsqueeze.recipes.stream import compress_streaming

    recipe = parse_recipe({"description": "s", "stages": [
        {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16, "calibration_samples": 4}]})
    folder = shutil.copytree(hf_dirs["gpt2"], tmp_path / "g")
    _rewrite(folder, lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"].clone()}))
    compress_streaming(f"hf:{folder}", recipe, tmp_path / "ok.dsq", "pydoc-sentences:calib", progress=False)
    _rewrite(folder, lambda s: s.update({"lm_head.weight": torch.randn(257, 32)}))
    with pytest.raises(ModelError, match="tie_word_embeddings"):
        compress_streaming(f"hf:{folder}", recipe, tmp_path / "x.dsq", "pydoc-sentences:calib", progress=False)
    with pytest.raises(ModelError, match="tie_word_embeddings"):
        resolve_model(f"hf:{folder}", progress=False)


def test_weights_transformers_would_not_report_missing_are_checked_against_the_files(tmp_path, hf_dirs,
                                                                                    monkeypatch):
    """A model class may tell transformers not to report some missing weights; they are still random."""
    folder = shutil.copytree(hf_dirs["bert"], tmp_path / "b")
    _rewrite(folder, lambda s: [s.pop(k) for k in ("pooler.dense.weight", "pooler.dense.bias")])
    monkeypatch.setattr(transformers.BertModel, "_keys_to_ignore_on_load_missing", [r"pooler\."])
    with pytest.raises(ModelError, match=r"no weight for pooler\.dense\.bias \(and 1 more\)"):
        resolve_model(f"hf:{folder}", progress=False)

"""Fuzzing ``hf:DIR`` folders: what a downloaded Hugging Face model folder may hold, edited by an attacker.

Seeds are tiny random-weight folders written by ``save_pretrained`` (``deepsqueeze.testing.hf_models``): a
BERT sentence encoder in the sentence-transformers layout (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``), a BERT sequence classifier, GPT-2 and Llama. Each case copies one and edits:

* ``config``: a field's type swapped, sizes huge (``n_layer`` 10**6, ``vocab_size`` 10**9, 2**63), negative or
  given as digits, deep nesting, ``model_type`` / ``architectures`` / dtype swapped, label maps amplified,
  or the raw text damaged;
* ``safetensors``: the JSON header at the start of a ``.safetensors`` file (dtype, shape, data offsets,
  names, ``__metadata__``, the header length) or its data (NaN, Inf, the largest finite float);
* ``modules``: ``modules.json``, the pooling config and ``sentence_bert_config.json``;
* ``tokenizer``: ``tokenizer.json`` (vocabulary ids, added tokens, model type, normalizers, post-processor
  ids, truncation and padding) and ``tokenizer_config.json``;
* ``references``: a file names code (``auto_map``, a tokenizer or module class), another folder or a file
  outside the model folder (the canary).

The oracle: ``resolve_model("hf:DIR")`` raises ``ModelError`` (or another documented error) or returns a model
whose tokenizer and forward pass run to finite outputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fuzz.oracle import (
    Campaign,
    Canary,
    ForwardFailure,
    case_rng,
    mutate_json,
    mutate_text,
    nested,
    off_by_one,
)

SURFACE = "hf"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_HF_CASES", "40"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))
FAMILIES = ("bert", "bert-classifier", "gpt2", "llama")
KINDS = ["config", "safetensors", "modules", "tokenizer", "references"]
WEIGHTS = [30, 30, 12, 20, 8]
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "a", "Compression keeps what matters; 42 é ü."]
SIZE_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "n_inner",
             "num_key_value_heads", "head_dim", "num_labels", "pad_token_id", "bos_token_id", "eos_token_id",
             "layer_norm_eps", "rms_norm_eps", "rope_theta", "hidden_dropout_prob", "initializer_range"]
SIZES = [10**6, 10**9, 2**31, 2**63, 10**30, 2**16 + 1, -1, 0, 1, 3, "12", 12.0, 1e-300, True, None, [12], {"a": 1}]
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "U16",
          "U32", "U64", "F4", "X", "", 5, None]


def _seeds(tmp: Path) -> list[Path]:
    from deepsqueeze.testing.hf_models import make_hf_dir

    folders = []
    for family in FAMILIES:
        folder = make_hf_dir(family, tmp / "seeds" / family)
        if family == "bert":  # the sentence-transformers layout, as all-MiniLM-L6-v2 ships it
            modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                       {"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"}]
            (folder / "modules.json").write_text(json.dumps(modules, indent=2))
            (folder / "1_Pooling").mkdir(exist_ok=True)
            (folder / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                 "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
            (folder / "2_Normalize").mkdir(exist_ok=True)
            (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128,
                                                                            "do_lower_case": False}))
        folders.append(folder)
    return folders


# --- safetensors headers -----------------------------------------------------------------------------------------

def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict[str, Any] | bytes, body: bytes, length_delta: int = 0) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", max(0, len(text) + length_delta)) + text + body


def _mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    header, body = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(11)
    name = rng.choice(names)
    entry = header[name]
    if op == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif op == 1:
        entry["shape"] = rng.choice([off_by_one(rng, entry["shape"]), entry["shape"][::-1], [], [0], [2**40],
                                     [-1], [*entry["shape"], 1], [1, *entry["shape"]], ["1"], [1.0], None])
    elif op == 2:
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([off_by_one(rng, entry["data_offsets"]), entry["data_offsets"][::-1],
                                            list(other), [0, 0], [0, len(body) + 4], [len(body), len(body) + 4],
                                            [2**63, 2**63 + 4], [-4, 0], [0], None, "0-4"])
    elif op == 3:
        header[rng.choice(names + ["lm_head.weight", "x", "", "0" * 300])] = header.pop(name)  # renamed
    elif op == 4:
        del header[name]
    elif op == 5:
        header[name + ".copy"] = dict(entry)  # a second name for the same bytes
    elif op == 6:
        header["__metadata__"] = rng.choice([{"format": "tf"}, {"format": "flax"}, {}, {"format": 1}, [],
                                             {"format": "pt", "x": {"y": 1}}, {"format": "pt" * 10_000}, None])
    elif op == 7:  # the header length field alone
        return join_safetensors(header, body, rng.choice([1, -1, 8, -8, 2**40, -(2**40), 7]))
    elif op == 8:
        text = json.dumps(header, separators=(",", ":")).encode()
        return join_safetensors(mutate_text(rng, text), body)
    elif op == 9:  # the data: NaN, Inf, the largest finite float, a run of random bytes
        start, end = entry["data_offsets"]
        raw = bytearray(body)
        if end > start:
            pos = start + 4 * rng.randrange(max(1, (end - start) // 4))
            raw[pos : pos + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f",
                                             b"\xff\xff\x7f\xff", bytes(rng.randrange(256) for _ in range(4))])
        return join_safetensors(header, bytes(raw))
    else:
        mutate_json(rng, header, names)
    return join_safetensors(header, body)


# --- folder files ------------------------------------------------------------------------------------------------

def _mutate_config(rng: random.Random, config: dict[str, Any], names: list[str]) -> Any:
    op = rng.randrange(8)
    if op <= 2:
        key = rng.choice([k for k in SIZE_KEYS if k in config] or SIZE_KEYS)
        config[key] = rng.choice(SIZES)
    elif op == 3:
        config[rng.choice(["model_type", "architectures", "torch_dtype", "dtype", "attn_implementation",
                           "tie_word_embeddings", "is_decoder", "add_cross_attention", "problem_type",
                           "position_embedding_type", "hidden_act", "activation_function", "rope_scaling",
                           "quantization_config", "layer_types", "transformers_version"])] = rng.choice([
            "gpt2", "llama", "bert", "roberta", "qwen2", "t5", ["BertModel"], ["GPT2LMHeadModel"],
            ["BertForSequenceClassification"], "float64", "int8", "bfloat16", "flash_attention_2", "sdpa", "eager",
            "relative_key", "gelu_new", "nope", {"rope_type": "dynamic", "factor": 10**9}, {"quant_method": "gptq"},
            ["x"] * 100, None, True, 10**9])
    elif op == 4:
        n = rng.choice([1, 2, 1000, 100_000])
        config["id2label"] = {str(i): f"L{i}" for i in range(n)}
        config["label2id"] = {f"L{i}": i for i in range(n)} if rng.random() < 0.5 else {"x": 10**9}
    elif op == 5:
        config[rng.choice(list(config))] = nested(rng)
    else:
        mutate_json(rng, config, names)
    return config


def _mutate_tokenizer(rng: random.Random, tok: dict[str, Any], names: list[str]) -> Any:
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab = model.get("vocab")
    op = rng.randrange(9)
    if op == 0 and isinstance(vocab, dict) and vocab:  # a vocabulary id past the embedding table
        for _ in range(rng.choice([1, 5])):
            vocab[rng.choice(list(vocab))] = rng.choice([10**9, 2**31, 2**63, -1, len(vocab), len(vocab) + 1, 0])
    elif op == 1 and tok.get("added_tokens"):
        added = rng.choice(tok["added_tokens"])
        added[rng.choice(["id", "content", "special", "normalized"])] = rng.choice([10**9, -1, 2**40, "", None,
                                                                                    "[UNK]", True, 5])
    elif op == 2:
        model[rng.choice(["type", "unk_token", "continuing_subword_prefix", "max_input_chars_per_word", "dropout",
                          "byte_fallback", "fuse_unk"])] = rng.choice(["BPE", "WordPiece", "Unigram", "WordLevel", "",
                                                                       "[NOPE]", -1, 10**9, 2.5, None, True])
    elif op == 3:
        tok[rng.choice(["normalizer", "pre_tokenizer", "post_processor", "decoder"])] = rng.choice([
            None, {"type": "Nope"}, {"type": "Sequence", "normalizers": [{"type": "Sequence"}] * 3},
            {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}],
             "pair": [], "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [10**9], "tokens": ["[CLS]"]}}},
            {"type": "BertProcessing", "sep": ["[SEP]", 10**9], "cls": ["[CLS]", -1]},
            {"type": "Replace", "pattern": {"Regex": "(a*)*b" * 50}, "content": "x"}, nested(rng, 40)])
    elif op == 4:
        tok[rng.choice(["truncation", "padding"])] = rng.choice([
            None, {"max_length": 10**9, "strategy": "LongestFirst", "stride": 10**9, "direction": "Right"},
            {"max_length": -1}, {"strategy": {"Fixed": 10**7}, "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 10**9, "pad_type_id": 0, "pad_token": "[PAD]"}, []])
    elif op == 5 and isinstance(vocab, dict):
        model["vocab"] = rng.choice([{}, [], {"[UNK]": 0}, {k: v for k, v in list(vocab.items())[:10]}, None])
    elif op == 6 and isinstance(model.get("merges"), list):
        model["merges"] = rng.choice([[], ["a b c"], [["a", "b"]] * 1000, None, [1, 2]])
    else:
        mutate_json(rng, tok, names, focus=lambda p: p[0] != "model" or p[:2] != ("model", "vocab"), steps=1)
    return tok


def _mutate_tokenizer_config(rng: random.Random, cfg: dict[str, Any], names: list[str]) -> Any:
    key = rng.choice(["model_max_length", "pad_token", "unk_token", "eos_token", "bos_token", "tokenizer_class",
                      "do_lower_case", "padding_side", "truncation_side", "added_tokens_decoder", "chat_template",
                      "clean_up_tokenization_spaces", "extra_special_tokens", "model_input_names"])
    cfg[key] = rng.choice([10**30, -1, 0, "x", "", None, True, "[UNK]", {"content": 5}, ["input_ids", "nope"],
                           {"100000000": {"content": "z", "special": True}}, "left", "middle", "BertTokenizer",
                           "GPT2Tokenizer", "LlamaTokenizer", "NopeTokenizer", "{{ 7 * 7 }}", nested(rng, 40)])
    if rng.random() < 0.3:
        mutate_json(rng, cfg, names)
    return cfg


def _mutate_modules(rng: random.Random, folder: Path, names: list[str]) -> tuple[str, bytes]:
    target = rng.choice(["modules.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"])
    file = folder / target
    data: Any = json.loads(file.read_text()) if file.is_file() else []
    if target == "modules.json" and isinstance(data, list) and data and rng.random() < 0.6:
        entry = rng.choice(data)
        entry[rng.choice(["path", "type", "name", "idx"])] = rng.choice([
            "", "..", "../..", "/", "1_Pooling/../..", "nope", None, 5, [], {}, "x" * 300, "\x00",
            "sentence_transformers.models.Dense", "sentence_transformers.models.Pooling", "Normalize", "Pooling"])
    elif target == "sentence_bert_config.json" and isinstance(data, dict):
        data["max_seq_length"] = rng.choice([10**30, 2**63, -1, 0, "128", 1e308, None, True, [128], 1.5])
    elif rng.random() < 0.2:
        return target, mutate_text(rng, file.read_bytes() if file.is_file() else b"[]")
    else:
        data = mutate_json(rng, data, names)
    return target, json.dumps(data).encode()


def _mutate_references(rng: random.Random, folder: Path, canary: Canary) -> tuple[str, bytes]:
    refs = canary.references()
    target = rng.choice(["config.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json"])
    file = folder / target
    data: Any = json.loads(file.read_text()) if file.is_file() else ({} if target != "modules.json" else [])
    if target == "modules.json":
        data = data if isinstance(data, list) else []
        data.append({"idx": len(data), "name": "x", "path": rng.choice([str(canary.secret), "../../canary/secret",
                                                                        os.path.relpath(canary.secret, folder)]),
                     "type": rng.choice(["sentence_transformers.models.Pooling", "canary_mod.Thing"])})
    else:
        key = rng.choice(["auto_map", "tokenizer_class", "_name_or_path", "tokenizer_file", "vocab_file",
                          "custom_pipelines", "model_type", "name_or_path", "processor_class", "feature_extractor_type",
                          "auto_map.AutoTokenizer", "base_model_name_or_path", "adapter_config"])
        value: Any = rng.choice(refs)
        if key.startswith("auto_map"):
            value = {"AutoModel": "canary_mod.Thing", "AutoConfig": "canary_mod.Thing",
                     "AutoTokenizer": ["canary_mod.Tok", "canary_mod.Tok"]}
        elif key == "custom_pipelines":
            value = {"x": {"impl": "canary_mod.Thing", "pt": ["AutoModel"]}}
        data[key.split(".")[0]] = value
    return target, json.dumps(data).encode()


def mutate(rng: random.Random, seed: Path, canary: Canary) -> tuple[str, dict[str, bytes]]:
    """(kind, {relative path: new bytes}) for one case."""
    kind = rng.choices(KINDS, WEIGHTS)[0]
    names = [k for k in split_safetensors((seed / "model.safetensors").read_bytes())[0] if k != "__metadata__"]
    strings = names + ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "<|endoftext|>"]
    if kind == "config":
        if rng.random() < 0.15:
            return kind, {"config.json": mutate_text(rng, (seed / "config.json").read_bytes())}
        config = _mutate_config(rng, json.loads((seed / "config.json").read_text()), strings)
        return kind, {"config.json": json.dumps(config).encode()}
    if kind == "safetensors":
        return kind, {"model.safetensors": _mutate_safetensors(rng, (seed / "model.safetensors").read_bytes())}
    if kind == "modules":
        target, data = _mutate_modules(rng, seed, strings)
        return kind, {target: data}
    if kind == "tokenizer":
        if rng.random() < 0.3:
            cfg = _mutate_tokenizer_config(rng, json.loads((seed / "tokenizer_config.json").read_text()), strings)
            return kind, {"tokenizer_config.json": json.dumps(cfg).encode()}
        if rng.random() < 0.15:
            return kind, {"tokenizer.json": mutate_text(rng, (seed / "tokenizer.json").read_bytes())}
        tok = _mutate_tokenizer(rng, json.loads((seed / "tokenizer.json").read_text()), strings)
        return kind, {"tokenizer.json": json.dumps(tok).encode()}
    target, data = _mutate_references(rng, seed, canary)
    return kind, {target: data}


# --- the campaign ------------------------------------------------------------------------------------------------

def check_model(model: Any) -> None:
    """A loaded hf: model tokenizes and runs to finite outputs (what evaluate and compress do with it)."""
    module = model.module
    try:
        with torch.no_grad():
            tokens = module.tokenize(SENTENCES)
            out = module(**tokens)
    except Exception as exc:  # noqa: BLE001 - a loaded model that does not run is the finding
        raise ForwardFailure(f"loaded, then tokenize/forward raised {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(out, torch.Tensor) or not bool(torch.isfinite(out).all()):
        raise ForwardFailure("loaded, then computed NaN or Inf")


def _materialize(seed: Path, case_dir: Path, files: dict[str, bytes]) -> None:
    """``case_dir`` = ``seed`` hard-linked (never written: edited files are replaced, not rewritten)."""
    shutil.copytree(seed, case_dir, copy_function=os.link)
    for rel, data in files.items():
        path = case_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_bytes(data)


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def run_campaign(cases: int, seed: int, tmp: Path, start: int = 0, progress: Any = None) -> dict[str, Any]:
    from deepsqueeze.resolve import resolve_model

    tmp = Path(tmp)
    canary = Canary(tmp / "canary")
    seeds = _seeds(tmp)
    before = {s: _fingerprint(s) for s in seeds}
    for folder in seeds:  # warm-up: transformers' lazy imports, tokenizers, kernels
        check_model(resolve_model(f"hf:{folder}", progress=False))
    campaign = Campaign(SURFACE, canary)
    campaign.warmed()
    for case in range(start, start + cases):
        if progress:
            progress(case)
        rng = case_rng(SURFACE, seed, case)
        folder = rng.choice(seeds)
        kind, files = mutate(rng, folder, canary)
        case_dir = tmp / "cases" / f"{folder.name}-{case}"
        _materialize(folder, case_dir, files)
        campaign.case(case, f"{kind}", lambda: check_model(resolve_model(f"hf:{case_dir}", progress=False)))  # noqa: B023 - called at once
        shutil.rmtree(case_dir, ignore_errors=True)
        if campaign.stop:
            break
    for folder in seeds:
        if _fingerprint(folder) != before[folder]:
            campaign.stats["failures"].append([-1, "seed", f"a seed file of {folder.name} was rewritten"])
    return campaign.result()


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_hf_folders_fail_cleanly(tmp_path):
    pytest.importorskip("transformers")
    result = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert result["failures"] == [], result["failures"][:5]
    assert result["documented_errors"] > 0 and result["ok"] > 0

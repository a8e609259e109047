"""GGUF export: a causal LM (Llama, Mistral, Qwen2 layouts) as one file llama.cpp loads and runs.

Tensors are what :func:`deepsqueeze.runtime.gguf_forms.gguf_form` makes of each layer: packed codes carried over
onto llama.cpp's block types (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``), float weights and norms as
``F32``, the rest decoded to ``F16`` with the reason in the export's layer list. Names follow llama.cpp
(``gguf``'s tensor-name map); Llama's query and key rows are reordered into llama.cpp's rotary layout, as its
converter does. A head that computes with the token embedding's codes (tied) is not written: llama.cpp then
uses ``token_embd`` as the output, as it does for the original model.

Metadata: the architecture's sizes from the (possibly pruned) model itself (blocks left, heads kept per layer,
FFN width), and the tokenizer: copied field by field from the GGUF file the model came from (``gguf:FILE``,
``zoo:smollm2-135m``), else built from the Hugging Face tokenizer (byte-level BPE: tokens, merges, special
tokens, chat template). Anything llama.cpp's graph for the architecture does not have (a factored layer, heads
or FFN widths that differ between blocks, rope scaling) is refused in one line before anything is written.

Verified before it is reported: the file is decoded by transformers' GGUF reader (every tensor dequantized by
``gguf``) and its logits on the sample prompts compared with the torch model's (same token ids), then run in
llama.cpp (``llama-cpp-python``) where it is installed, which also rounds activations to 8 bits, so its
tolerance is wider; the result says what ran.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import ModelError
from deepsqueeze.export.check import (
    TOLERANCE_QUANTIZED_ACTIVATIONS,
    ExportResult,
    compare_outputs,
    size_of,
    verify,
)
from deepsqueeze.runtime import GGUFForm, Int8Conv2d, Int8Linear, gguf_form

__all__ = ["ARCHITECTURES", "TOLERANCE_GGUF", "TOLERANCE_LLAMA_CPP", "gguf_runtime", "write_gguf"]

ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
QUANTIZED_BY = "deepsqueeze"  # general.quantized_by of every file written here: what --force may replace
# worst 1 - cos of the logits: the file's values (fp16 scales) / llama.cpp, which also rounds activations to 8 bits
# for its block dot products (SmolLM2-135M at 4 bits: 3e-6 / 9e-3)
TOLERANCE_GGUF, TOLERANCE_LLAMA_CPP = 1e-4, 5e-2
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_M",
              "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}  # the label of the most common tensor type
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED = 1, 3, 4, 5
PROMPTS = 4


def _rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order of llama.cpp's rotary layout for a query / key weight of ``rows`` rows in ``heads`` heads
    (transformers' rotate-half halves interleaved back, as ``convert_hf_to_gguf.py`` permutes them)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _holders(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding tensors of their own (parameters or persistent buffers), outermost first; a
    representation counts as one holder with its buffers."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in transformer.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in out):
            continue
        own = [p for p in module._parameters.values() if p is not None] + [
            b for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set]
        if own:
            out.append((name, module))
    return out


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ModelError(f"GGUF export writes plain rotary positions; this model uses {kind} rope scaling")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _sizes(transformer: nn.Module, config: Any) -> dict[str, int]:
    """Blocks, heads, key-value heads and FFN width as the model holds them (pruning included); one value each."""
    layers = transformer.model.layers
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    shapes = {"heads": set(), "kv_heads": set(), "ffn": set()}
    for block in layers:
        attn, mlp = block.self_attn, block.mlp
        shapes["heads"].add(_out_features(attn.q_proj) // head_dim)
        shapes["kv_heads"].add(_out_features(attn.k_proj) // head_dim)
        shapes["ffn"].add(_out_features(mlp.up_proj))
    for key, values in shapes.items():
        if len(values) != 1:
            raise ModelError(f"GGUF export: the blocks differ in {key} ({sorted(values)}); llama.cpp takes one value "
                             "for every block: prune every block alike, or use --format onnx")
    return {"blocks": len(layers), "hidden": hidden, "head_dim": head_dim, "heads": shapes["heads"].pop(),
            "kv_heads": shapes["kv_heads"].pop(), "ffn": shapes["ffn"].pop()}


def _out_features(layer: nn.Module) -> int:
    for attr in ("out_features", "num_embeddings"):
        if isinstance(getattr(layer, attr, None), int):
            return int(getattr(layer, attr))
    raise ModelError(f"GGUF export: {type(layer).__name__} is not a layer llama.cpp runs; use --format onnx")


def _tied(head: nn.Module, table: nn.Module) -> bool:
    """The head computes with the table's very tensors (codes or float weight)."""
    for attr in ("codes", "weight"):
        a, b = getattr(head, attr, None), getattr(table, attr, None)
        if isinstance(a, torch.Tensor) and a is b:
            return True
    return False


def _tensors(transformer: nn.Module, arch: str, sizes: dict[str, int]) -> list[tuple[str, GGUFForm]]:
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch]), sizes["blocks"])
    table = transformer.get_submodule("model.embed_tokens")
    out: list[tuple[str, GGUFForm]] = []
    for name, module in _holders(transformer):
        if name == "lm_head" and _tied(module, table):
            continue
        target = names.get_name(name)
        if target is None:
            raise ModelError(f"GGUF export: {name} ({type(module).__name__}) has no place in llama.cpp's {arch} "
                             "graph; use --format onnx")
        rows = None
        if ARCHITECTURES[arch] == "LLAMA" and name.endswith(("q_proj", "k_proj")):
            rows = _rotary_rows(_out_features(module), sizes["heads" if name.endswith("q_proj") else "kv_heads"])
        try:
            out.append((f"{target}.weight", gguf_form(module, rows)))
        except TypeError as exc:
            raise ModelError(f"GGUF export: {name}: {exc}; use --format onnx") from None
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias = bias.detach().float()
            out.append((f"{target}.bias", GGUFForm("F32", (bias if rows is None else bias[rows]).numpy(),
                                                   tuple(bias.shape), True, "float32")))
    return out


# -- tokenizer


def _source_file(model: Model) -> Path | None:
    """The GGUF file the model was read from (its base), when it is still there."""
    if model.base.get("kind") != "gguf":
        return None
    from deepsqueeze.zoo.resolve import validate_base

    try:
        path = validate_base(model.base).file()  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - the package or file is gone: the tokenizer is rebuilt from transformers'
        return None
    return path if path.is_file() else None


def _copy_tokenizer(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)


def _bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    bpe = data.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ModelError(f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2); this "
                         f"model's is {bpe.get('type') or type(tokenizer).__name__}")
    size = max([vocab_size, *(int(i) + 1 for i in bpe["vocab"].values()),
                *(int(t["id"]) + 1 for t in data.get("added_tokens", []))])
    tokens: list[str | None] = [None] * size
    types = [TOKEN_NORMAL] * size
    for text, index in bpe["vocab"].items():
        tokens[int(index)] = text
    for added in data.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
        types[int(added["id"])] = TOKEN_CONTROL if added.get("special") else TOKEN_USER
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", TOKEN_UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    if not merges:  # llama.cpp refuses a BPE vocabulary without merges: one no text can reach (two control tokens)
        control = next((t for t, k in zip(tokens, types, strict=True) if k == TOKEN_CONTROL and " " not in t), None)
        if control is None:
            raise ModelError("GGUF export: this tokenizer has no merges and no special token; llama.cpp needs both")
        merges = [f"{control} {control}"]
    pre = (data.get("pre_tokenizer") or {}).get("type")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2" if pre == "ByteLevel" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# -- writing and checking


def write_gguf(model: Model, path: Path, sample: Any, threads: int = 2) -> ExportResult:
    """Write ``model`` (a causal LM) as a GGUF file at ``path`` and check it on ``sample`` (a ``tokenize`` batch)
    through transformers' GGUF reader and in llama.cpp where installed (:func:`_check`), else ModelError and the
    caller leaves nothing written.

    Raises:
        ModelError: not a causal LM of :data:`ARCHITECTURES`, a layer llama.cpp's graph lacks, a tokenizer
            that is not byte-level BPE, or a failed check.
    """
    import gguf

    transformer = getattr(model.module, "transformer", None)
    config = getattr(transformer, "config", None)
    arch = getattr(config, "model_type", None)
    if model.task is not Task.CAUSAL_LM or arch not in ARCHITECTURES:
        raise ModelError(f"GGUF export takes causal LMs of the {', '.join(sorted(ARCHITECTURES))} families; this is "
                         f"a {arch or model.task.value}: use --format onnx")
    assert transformer is not None and config is not None
    gguf_arch = "llama" if ARCHITECTURES[arch] == "LLAMA" else "qwen2"
    sizes = _sizes(transformer, config)
    theta = _rope_theta(config)
    tensors = _tensors(transformer, arch, sizes)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(str(getattr(config, "name_or_path", "") or model.ref)[:200])
    writer.add_quantized_by(QUANTIZED_BY)
    counts: dict[str, int] = {}
    for _, form in tensors:
        if len(form.shape) == 2:
            counts[form.type] = counts.get(form.type, 0) + int(np.prod(form.shape))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[max(counts, key=counts.__getitem__)]).value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(sizes["hidden"])
    writer.add_block_count(sizes["blocks"])
    writer.add_feed_forward_length(sizes["ffn"])
    writer.add_head_count(sizes["heads"])
    writer.add_head_count_kv(sizes["kv_heads"])
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(sizes["head_dim"])
    if sizes["head_dim"] * sizes["heads"] != sizes["hidden"]:
        writer.add_key_length(sizes["head_dim"])
        writer.add_value_length(sizes["head_dim"])
    writer.add_vocab_size(int(config.vocab_size))
    source = _source_file(model)
    if source is not None:
        _copy_tokenizer(writer, source)
    else:
        _bpe_tokenizer(writer, model.module.tokenizer, int(config.vocab_size))
    for name, form in tensors:
        if form.type in ("F32", "F16"):
            writer.add_tensor(name, form.data)
        else:
            writer.add_tensor(name, form.data, raw_dtype=getattr(gguf.GGMLQuantizationType, form.type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layers = [{"tensor": name, "type": form.type, "exact": str(form.exact).lower(), "note": form.note}
              for name, form in tensors]
    return ExportResult(str(path), "gguf", size_of(path), layers, _check(model, path, sample, threads))


def gguf_runtime() -> str:
    """What runs a GGUF file here: ``llama.cpp`` when llama-cpp-python imports, else transformers' reader."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llama.cpp"


def _prompts(sample: Any) -> list[list[int]]:
    ids, mask = sample["input_ids"], sample["attention_mask"]
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    return sorted((r for r in rows if r), key=len)[-PROMPTS:]


def _compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], tolerance: float) -> dict[str, Any]:
    check = compare_outputs(torch.cat(ours), torch.cat(theirs))
    if "worst_cosine_distance" in check:
        agree = [float((a.argmax(-1) == b.argmax(-1)).double().mean()) for a, b in zip(ours, theirs, strict=True)]
        check["top1_agreement"] = round(sum(agree) / len(agree), 4)
    return {**check, "tolerance": tolerance}


def _check(model: Model, path: Path, sample: Any, threads: int) -> dict[str, Any]:
    """The file against the torch model: decoded by transformers' GGUF reader (the file's values: within
    :data:`TOLERANCE_GGUF`), then run in llama.cpp where installed (its own arithmetic, 8-bit activations in
    block dot products: within :data:`TOLERANCE_LLAMA_CPP`)."""
    prompts = _prompts(sample)
    with torch.no_grad():
        ours = [model.module(input_ids=torch.tensor([p]))[0].float() for p in prompts]
    # int8 layers quantize their activations in torch, the reader computes in float: the ONNX export's tolerance
    acts = any(isinstance(m, (Int8Linear, Int8Conv2d)) for m in model.module.modules())
    tolerance = TOLERANCE_QUANTIZED_ACTIVATIONS if acts else TOLERANCE_GGUF
    check = {**_compare(ours, _reader_logits(path, prompts), tolerance), "runtime": "transformers' GGUF reader",
             "prompts": len(prompts)}
    verify(check, check["runtime"])
    if gguf_runtime() == "llama.cpp":
        ran = {**_compare(ours, _llama_cpp_logits(path, prompts, threads), TOLERANCE_LLAMA_CPP),
               "runtime": "llama.cpp"}
        verify(ran, "llama.cpp")
        check["runtime"] += " and llama.cpp (llama-cpp-python)"
        check["llama_cpp"] = {k: v for k, v in ran.items() if k != "runtime"}
    return check


def _llama_cpp_logits(path: Path, prompts: list[list[int]], threads: int) -> list[torch.Tensor]:
    from llama_cpp import Llama

    longest = max(len(p) for p in prompts)
    settings = dict(model_path=str(path), n_ctx=max(longest, 32), n_batch=max(longest, 32), logits_all=True,
                    n_threads=threads, n_gpu_layers=0)
    try:
        llm = Llama(**settings, verbose=False)
    except Exception:  # noqa: BLE001 - llama.cpp refused the file: load it again to read why (its own log)
        raise ModelError(f"llama.cpp cannot load the GGUF file written: {_load_error(Llama, settings)}") from None
    out = []
    try:
        for prompt in prompts:
            llm.reset()
            llm.eval(prompt)
            out.append(torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32)))
    finally:
        llm.close()
    return out


def _load_error(loader: Any, settings: dict[str, Any]) -> str:
    """The reason llama.cpp gives for refusing a file: its log's first error line (native stderr, captured)."""
    last = "no reason given"
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            loader(**settings, verbose=True)
        except Exception as exc:  # noqa: BLE001 - the refusal expected
            last = str(exc)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").splitlines()
    found = next((line for line in lines if "error" in line.lower()), last)
    return found.strip()[:300]


def _reader_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    import transformers
    from transformers.utils import logging as hf_logging

    from deepsqueeze.zoo.gguf import quiet_gguf_reader

    hf_logging.disable_progress_bar()
    try:
        with quiet_gguf_reader():
            reread = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - the reader refused the file: the export is not written
        raise ModelError(f"transformers cannot read the GGUF file written: {str(exc)[:200]}") from None
    with torch.no_grad():
        return [reread(input_ids=torch.tensor([p]), use_cache=False).logits[0].float() for p in prompts]

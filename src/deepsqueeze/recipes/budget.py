"""The quality budget: what a recipe promises about quality, measured on held-out data before compress says done.

Every recipe carries ``max_drop`` (or the task's default below; ``--max-drop`` overrides). ``compress``
scores the uncompressed model and the result on the same held-out data, writes the best artifact it found,
and reports the measured drop against the budget; over budget, the CLI exits with :data:`EXIT_OVER_BUDGET`,
never 0. The metric and unit per task:

=====================  ==============================================================  =============
task                   metric (held-out data)                                          default
=====================  ==============================================================  =============
classifier             top-1 accuracy on the data's test split, drop in pp              1.0 pp
sequence-classifier    label agreement with the uncompressed model, drop in pp         2.0 pp
sentence-encoder       cosine_mean to the uncompressed model, drop = 1 - cosine_mean    0.03
causal-lm              perplexity (window 256, stride 128), increase in percent         10 %
=====================  ==============================================================  =============

Text tasks are scored on ``pydoc-sentences:eval`` (never calibrated or trained on), or on ``wiki:eval`` when
the stages' data is a ``wiki:`` split, at most :data:`TEXT_SAMPLES` sentences or paragraphs (causal LMs: at
most :data:`LM_CHARS` characters of them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.outputs import class_logits, flat_outputs
from deepsqueeze.data.datasets import ClassificationData, TextData

EXIT_OVER_BUDGET = 3
TEXT_SAMPLES = 256
OUTPUT_SAMPLES = 256
LM_CHARS = 60_000  # a causal LM is scored on about 15K tokens of them (a 135M model: about a minute on 2 cores)
HELD_OUT_TEXT = "pydoc-sentences:eval"


@dataclass
class BudgetCheck:
    """One measurement of a compressed model against its budget (``drop`` in ``unit``; lower is better)."""

    metric: str
    base: float
    value: float
    drop: float
    max_drop: float
    unit: str
    data: str
    samples: int

    @property
    def within(self) -> bool:
        return self.drop <= self.max_drop + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within": self.within}

    def message(self) -> str:
        verdict = "within" if self.within else "over"
        return (f"{self.metric} {self.value:.4g} against {self.base:.4g} uncompressed on {self.data} "
                f"({self.samples} samples): a drop of {self.drop:.3g} {self.unit}, {verdict} the budget of "
                f"{self.max_drop:g} {self.unit}")


def held_out(model: Model, data: ClassificationData | TextData | None) -> ClassificationData | TextData | None:
    """The data a budget is measured on: a classifier's own test split; for text the eval split of the
    Wikipedia sample when the stages' data comes from it, else held-out pydoc sentences."""
    if model.task is Task.CLASSIFIER:
        return data if isinstance(data, ClassificationData) else None
    from deepsqueeze.data.resolve import resolve_data

    return resolve_data("wiki:eval" if data is not None and data.name.startswith("wiki:") else HELD_OUT_TEXT)


@torch.no_grad()
def _score(model: Model, reference: Model, data: ClassificationData | TextData) -> tuple[str, float, float, int]:
    """(metric, reference's figure, model's figure, samples) of the task's metric on ``data``."""
    from deepsqueeze.eval import metrics

    task = model.task
    if task is Task.CLASSIFIER:
        assert isinstance(data, ClassificationData)
        if class_logits(model.module.eval()(data.test_x[:2]), data.num_classes) is None:
            return "output_cosine", 1.0, _output_cosine(model, reference, data), min(len(data.test_x), OUTPUT_SAMPLES)
        return "accuracy", metrics.accuracy(reference.module, data), metrics.accuracy(model.module, data), \
            len(data.test_y)
    sentences = list(data.sentences[:TEXT_SAMPLES])  # type: ignore[union-attr]
    if task is Task.CAUSAL_LM:
        window = min(256, int(getattr(model.module, "context_length", 256)))  # never past the position limit
        sentences = _first_chars(sentences, LM_CHARS)
        base, _ = metrics.perplexity(reference.module, sentences, window=window, stride=window // 2)
        value, tokens = metrics.perplexity(model.module, sentences, window=window, stride=window // 2)
        return "perplexity", base, value, tokens
    inputs = metrics.encoder_inputs(model.module, sentences)
    out = model.module.eval()(**inputs)
    ref = reference.module.eval()(**inputs)
    if task is Task.SEQUENCE_CLASSIFIER:
        return "label_agreement", 1.0, metrics.label_agreement(out, ref), len(sentences)
    cosine = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1)
    return "cosine_mean", 1.0, float(cosine.mean()), len(sentences)


def _first_chars(texts: list[str], limit: int) -> list[str]:
    """The leading texts up to ``limit`` characters in all (at least one)."""
    out, total = [], 0
    for text in texts:
        if out and total + len(text) > limit:
            break
        out.append(text)
        total += len(text)
    return out


@torch.no_grad()
def _output_cosine(model: Model, reference: Model, data: ClassificationData) -> float:
    """Mean cosine between the model's and the reference's outputs (all output tensors of a sample,
    flattened) on the first ``OUTPUT_SAMPLES`` test images: the fidelity of a model without class logits."""
    x = data.test_x[:OUTPUT_SAMPLES]
    ours, theirs = flat_outputs(model.module.eval()(x)), flat_outputs(reference.module.eval()(x))
    return float(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).mean())


#: metric -> (unit, default budget, drop from (base, value))
_DROPS = {
    "accuracy": ("pp accuracy", 1.0, lambda base, value: 100 * (base - value)),
    "label_agreement": ("pp label agreement", 2.0, lambda base, value: 100 * (base - value)),
    "cosine_mean": ("cosine", 0.03, lambda base, value: base - value),
    "output_cosine": ("cosine", 0.03, lambda base, value: base - value),
    "perplexity": ("% perplexity", 10.0, lambda base, value: 100 * (value / base - 1)),
}


def check_budget(model: Model, reference: Model, data: ClassificationData | TextData | None,
                 max_drop: float | None) -> BudgetCheck | None:
    """Measure ``model`` against ``reference`` on held-out data; None when the task has no held-out data
    here (a classifier compressed without image data). A classifier whose output holds no class logits (a
    detector, a decoder) is measured by the cosine of its outputs to the reference's."""
    evaluation = held_out(model, data)
    if evaluation is None:
        return None
    metric, base, value, samples = _score(model, reference, evaluation)
    unit, default, drop = _DROPS[metric]
    limit = default if max_drop is None else max_drop
    return BudgetCheck(metric, base, value, drop(base, value), limit, unit, evaluation.name, samples)

"""Model builders (LeNet-300-100, LeNet-5, vgg-small), the Hugging Face loader, and the model-ref resolver."""

from deepsqueeze.zoo.builders import ZOO, build_zoo_model
from deepsqueeze.zoo.hf import (
    CausalLM,
    SentenceEncoder,
    TextClassifier,
    detect_hf_task,
    load_hf_model,
    load_sentence_encoder,
    minilm_dir,
)
from deepsqueeze.zoo.resolve import MODEL_HELP, build_base, resolve_base_model

__all__ = [
    "MODEL_HELP",
    "ZOO",
    "CausalLM",
    "SentenceEncoder",
    "TextClassifier",
    "build_base",
    "build_zoo_model",
    "detect_hf_task",
    "load_hf_model",
    "load_sentence_encoder",
    "minilm_dir",
    "resolve_base_model",
]

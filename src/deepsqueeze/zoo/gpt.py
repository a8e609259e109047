"""``zoo:gpt-tiny@pydoc``: a small GPT-2-style causal LM trained deterministically on Python's own docs.

Architecture (transformers' GPT-2, built from this code, no files): byte-level vocabulary (257 tokens,
:mod:`deepsqueeze.zoo.byte_tokenizer`), 4 blocks of width 192 with 4 heads, 128 positions, tied input and
output embeddings: 1,853,760 parameters. Training data: ``pydoc-sentences:calib`` joined with newlines
into one byte stream (136 KB); ``pydoc-sentences:eval`` is never trained on and is the perplexity split.
Training: windows of 128 tokens starting every 64, shuffled per epoch with a fixed seed, batch 32,
AdamW (lr 3e-3, weight decay 0.01, cosine schedule), ``GPT_TINY_EPOCHS`` (2) epochs of 67 steps, one
seed: same code, same torch -> same weights. The checkpoint is cached as safetensors like the other zoo models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.files import atomic_write
from deepsqueeze.core.model import Model, Task
from deepsqueeze.errors import DataError, ModelError

GPT_TINY_CONFIG: dict[str, Any] = dict(vocab_size=257, n_embd=192, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, tie_word_embeddings=True)
GPT_TINY_EPOCHS = 2
GPT_TINY_SEED = 0
GPT_TINY_VERSION = 1
LM_ZOO = ("gpt-tiny",)
LM_DATA = ("pydoc",)


def build_gpt_tiny() -> nn.Module:
    """The untrained ``gpt-tiny`` CausalLM (fixed seed 0 initialisation)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from deepsqueeze.zoo.byte_tokenizer import byte_tokenizer
    from deepsqueeze.zoo.hf import CausalLM

    hf_logging.set_verbosity_error()
    torch.manual_seed(GPT_TINY_SEED)
    transformer = GPT2LMHeadModel(GPT2Config(**GPT_TINY_CONFIG)).eval()
    return CausalLM(transformer, byte_tokenizer(pad=True, model_max_length=GPT_TINY_CONFIG["n_positions"])).eval()


def token_stream(module: nn.Module, split: str) -> torch.Tensor:
    """The pydoc-sentences ``split`` joined with newlines, as one 1-D tensor of token ids."""
    from deepsqueeze.data.text import load_pydoc_sentences

    text = "\n".join(load_pydoc_sentences(split).sentences)
    return torch.tensor(module.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # type: ignore[operator,union-attr]


def train_gpt_tiny(progress: bool = True, epochs: float = GPT_TINY_EPOCHS) -> nn.Module:
    """Train gpt-tiny on ``pydoc-sentences:calib`` with its fixed recipe (see the module docstring)."""
    from deepsqueeze.train.loop import fit, seed_everything

    seed_everything(GPT_TINY_SEED)
    module = build_gpt_tiny()
    ids = token_stream(module, "calib")
    window, stride, batch = GPT_TINY_CONFIG["n_positions"], 64, 32
    starts = torch.arange(0, len(ids) - window, stride)
    blocks = torch.stack([ids[s : s + window] for s in starts.tolist()])
    steps = (len(blocks) + batch - 1) // batch

    def batches(epoch: int):
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(GPT_TINY_SEED + epoch))
        for i in range(0, len(order), batch):
            yield blocks[order[i : i + batch]]

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=x)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    module.train()
    fit(module, batches, loss, epochs=epochs, steps_per_epoch=steps, lr=3e-3, optimizer="adamw",
        weight_decay=0.01, schedule="cosine", seed=GPT_TINY_SEED, progress=progress, description="gpt-tiny")
    return module.eval()


def checkpoint_path() -> Path:
    from deepsqueeze.zoo.pretrained import cache_dir

    return cache_dir() / "zoo" / f"gpt-tiny@pydoc-v{GPT_TINY_VERSION}.safetensors"


def pretrained_gpt_tiny(data_ref: str = "pydoc", progress: bool = True) -> Model:
    """``zoo:gpt-tiny@pydoc`` with its weights (trained once, then read from the cache)."""
    if data_ref not in LM_DATA:
        raise DataError(f"zoo:gpt-tiny trains on pydoc text only: use zoo:gpt-tiny@pydoc, not @{data_ref}")
    from safetensors.torch import load_file, save

    path = checkpoint_path()
    if path.exists():
        module = build_gpt_tiny()
        try:
            state = load_file(str(path))
            module.load_state_dict(state, strict=False)
            module.transformer.tie_weights()  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is reported, never trusted
            raise ModelError(f"cached checkpoint {path} is unreadable ({exc}): delete it to retrain") from None
    else:
        module = train_gpt_tiny(progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in module.state_dict().items() if k != "transformer.lm_head.weight"}
        payload = save(state)
        atomic_write(path, lambda fh: fh.write(payload))
    base = {"kind": "zoo-lm", "name": "gpt-tiny", "data": "pydoc"}
    return Model(module.eval(), base, Task.CAUSAL_LM, "zoo:gpt-tiny@pydoc", count_params(module),
                 meta={"checkpoint": str(path)})

"""Random-weight Llama-style checkpoints of any size, written shard by shard (never whole in memory).

For the streaming tests and the big-model benchmark: :func:`write_random_llama` writes ``config.json``,
sharded ``model-0000N-of-0000M.safetensors`` files with their ``model.safetensors.index.json`` (what
``save_pretrained`` writes for a large model) and a byte-level tokenizer. Weights are seeded normal draws
(std 0.02, norms 1), generated one tensor at a time, so a checkpoint larger than memory can be made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.core.skeleton import empty_weights
from deepsqueeze.zoo.byte_tokenizer import BYTE_VOCAB, EOS_ID, byte_tokenizer

__all__ = ["llama_config", "write_random_llama"]


def llama_config(hidden: int, layers: int, intermediate: int, heads: int = 8, kv_heads: int = 4,
                 vocab: int = BYTE_VOCAB) -> Any:
    """A ``LlamaConfig`` with grouped-query attention and untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                       bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False)


def write_random_llama(folder: str | Path, config: Any, *, shard_bytes: int = 1 << 30,
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write a random ``LlamaForCausalLM`` checkpoint for ``config`` into ``folder``; returns its parameter count.

    Memory: one shard (``shard_bytes``) plus one tensor at a time.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with empty_weights():
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(plan, start=1):
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name in names:
            if "norm" in name:
                shard[name] = torch.ones(shapes[name], dtype=dtype)
            else:
                shard[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(dtype)
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    params = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    total_bytes = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return params

"""Tiny random-weight GGUF files, written the way llama.cpp's converter writes a Llama (for ``gguf:FILE`` tests).

A byte-level BPE tokenizer (GPT-2's byte alphabet, three merges, an end-of-text token) and a 2-layer Llama
with grouped-query attention, hidden 64; ``tie``: no ``output.weight`` (the head is the token embedding).
Tensors are float32 (``quant``: ``"Q8_0"`` stores the 2-D ones quantized, as real GGUF files do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["make_gguf"]

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 96, 128
MERGES = ["t h", "Ġ t", "e r"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_gguf(path: str | Path, seed: int = 0, tie: bool = True, arch: str = "llama", quant: str | None = None,
              drop: tuple[str, ...] = (), extra: tuple[str, ...] = (), tokenizer: bool = True) -> Path:
    """Write a tiny Llama-layout GGUF to ``path``; ``drop``/``extra``: tensor names left out / added (for
    strict-loading tests); ``tokenizer=False``: no tokenizer fields."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [*_byte_alphabet(), *("".join(m.split()) for m in MERGES), "<|endoftext|>"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tie:
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                       f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                       f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                       f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
                       f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                       f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                       f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)})
    for name in extra:
        shapes[name] = (HIDDEN,)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * (vocab - 1) + [3])
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(vocab - 1)
        writer.add_eos_token_id(vocab - 1)
    for name, shape in shapes.items():
        if name in drop:
            continue
        norm = name.endswith("norm.weight") or len(shape) == 1
        value = (1.0 + 0.1 * rng.standard_normal(shape) if norm else 0.08 * rng.standard_normal(shape))
        value = value.astype(np.float32)
        if quant and len(shape) == 2:
            kind = getattr(gguf.GGMLQuantizationType, quant)
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

"""A byte-level tokenizer with no merges: every UTF-8 byte is one token (GPT-2's byte alphabet).

Ids 0-255 are the bytes, 256 is ``<|endoftext|>`` (also the beginning, unknown and padding token).
Built in code (nothing downloaded), so ``zoo:gpt-tiny`` and the test fixtures need no vocabulary file.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BYTE_VOCAB", "EOS_ID", "byte_tokenizer"]

BYTE_VOCAB = 257
EOS_ID = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_tokenizer(pad: bool = False, model_max_length: int = 1024) -> Any:
    """A ``PreTrainedTokenizerFast`` over bytes; ``pad=False`` leaves it without a pad token (as GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    extra = {"pad_token": special} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special, unk_token=special,
                                   model_max_length=model_max_length, **extra)

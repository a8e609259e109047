"""Text generation for a :class:`deepsqueeze.zoo.hf.CausalLM`, with a KV cache, on whatever representation its
layers hold (float, int8, packed 2..8-bit codes, sparse, removed blocks): the loop only calls the model.

One prompt (batch 1). The prompt is run once (prefill) and its keys and values kept; each new token then runs
alone against that cache (decode), as llama.cpp and ONNX Runtime GenAI do. ``cache=False`` recomputes the whole
sequence for every token instead (the reference the cached loop must equal). Greedy at ``temperature`` 0,
otherwise sampling from ``softmax(logits / temperature)`` with a generator seeded by ``seed`` (same inputs and
seed, same tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deepsqueeze.errors import DataError, ModelError

__all__ = ["MAX_TEMPERATURE", "Generation", "cache_argument", "generate", "prompt_ids"]

MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced: the text and ids after the prompt, and the time each phase took.

    ``stopped``: ``eos`` (the model ended it), ``length`` (``max_new_tokens`` reached) or ``context`` (the
    model's context is full). Seconds are wall-clock; tokens/s are ``prompt_tokens / prefill_s`` and
    ``(new tokens - 1) / decode_s`` (the first new token comes from the prefill)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped: str
    cache: bool

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_tokens": len(self.token_ids),
                "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 2),
                "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 2)}


def prompt_ids(lm: Any, prompt: str | list[int], chat: bool = False) -> list[int]:
    """The token ids of ``prompt`` as the model reads it: its chat template applied (``chat``), else its
    tokenizer's special tokens added; a list of token ids is taken as it is.

    Raises:
        ModelError: ``chat`` and the tokenizer has no chat template.
        DataError: ``prompt`` is neither text nor token ids of the vocabulary, or tokenizes to nothing.
    """
    if isinstance(prompt, list) and not chat:
        vocab = int(lm.transformer.config.vocab_size)
        if not prompt or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in prompt):
            raise DataError(f"token ids are integers in 0..{vocab - 1}, at least one")
        return list(prompt)
    if not isinstance(prompt, str):
        raise DataError(f"the prompt is text (str), got {type(prompt).__name__}")
    tokenizer = lm.tokenizer
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError("this model's tokenizer has no chat template: drop --chat to give the prompt as it is")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise DataError("the prompt is empty: give at least one token of text")
    return ids


def _stop_ids(lm: Any) -> set[int]:
    ids: set[int] = set()
    for source in (lm.tokenizer, getattr(lm.transformer, "generation_config", None), lm.transformer.config):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return {int(i) for i in ids}


def cache_argument(transformer: Any) -> str:
    """The name transformers gives the KV cache in this version (``cache`` from 5.x, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(transformer.forward).parameters else "past_key_values"


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(lm: Any, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             chat: bool = False, cache: bool = True, ignore_eos: bool = False) -> Generation:
    """Continue ``prompt`` (text, or token ids) with at most ``max_new_tokens`` tokens (batch 1) from ``lm`` (a
    CausalLM).

    Stops at an end-of-sequence token (unless ``ignore_eos``: speed measurements of a fixed length) or when the
    model's context (``lm.context_length``) is full.

    Raises:
        DataError: ``max_new_tokens`` outside 1..context, ``temperature`` outside 0..100, or a prompt that
            fills the context alone (the message gives both lengths).
        ModelError: ``chat`` without a chat template.
    """
    context = int(lm.context_length)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= context:
        raise DataError(f"max new tokens {max_new_tokens!r} must be 1..{context} (the model's context)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise DataError(f"temperature {temperature!r} must be 0 (greedy) .. {MAX_TEMPERATURE:g}")
    ids = prompt_ids(lm, prompt, chat)
    if len(ids) >= context:
        raise DataError(f"the prompt is {len(ids)} tokens and the model's context is {context}: shorten the prompt")
    device = next((p.device for p in lm.parameters()), None) or next(
        (b.device for b in lm.buffers()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(int(seed))
    stops = set() if ignore_eos else _stop_ids(lm)
    name = cache_argument(lm.transformer)
    out: list[int] = []
    was_training = lm.training
    lm.eval()
    stopped = "length"
    try:
        with torch.inference_mode():
            seq = torch.tensor([ids], dtype=torch.long, device=device)
            start = time.perf_counter()
            result = lm.transformer(input_ids=seq, use_cache=cache)
            past = getattr(result, name) if cache else None
            token = _next_token(result.logits[0, -1], temperature, generator)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            while True:
                out.append(token)
                if token in stops:
                    stopped = "eos"
                    break
                if len(out) == max_new_tokens:
                    break
                if len(ids) + len(out) >= context:
                    stopped = "context"
                    break
                nxt = torch.tensor([[token]], dtype=torch.long, device=device)
                if cache:
                    result = lm.transformer(input_ids=nxt, use_cache=True, **{name: past})
                    past = getattr(result, name)
                else:
                    seq = torch.cat([seq, nxt], dim=1)
                    result = lm.transformer(input_ids=seq, use_cache=False)
                token = _next_token(result.logits[0, -1], temperature, generator)
            decode = time.perf_counter() - start
    finally:
        lm.train(was_training)
    text = lm.tokenizer.decode(out, skip_special_tokens=True)
    return Generation(text, out, len(ids), prefill, decode, stopped, cache)

"""Causal-LM quality as LLM users read it: perplexity over a sliding window, next-token agreement with the base
model, agreement of greedy generations, and generation speed (prompt and decode tokens/s with a KV cache).

Every function takes a ``CausalLM``-like module: ``module(input_ids=..., attention_mask=...)`` returns logits
``(batch, tokens, vocabulary)`` and ``module.tokenizer`` is a Hugging Face tokenizer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.progress import track
from deepsqueeze.errors import DataError

DEFAULT_WINDOW = 512


@dataclass
class LMScores:
    """Perplexity of ``tokens`` scored tokens (windows of ``window`` tokens ending every ``stride``); with a
    reference also its perplexity on the same tokens and the share of positions whose top-1 next token
    equals the reference's."""

    perplexity: float
    tokens: int
    window: int
    stride: int
    base_perplexity: float | None = None
    top1_agreement: float | None = None
    top1: torch.Tensor | None = field(default=None, repr=False)  # the model's top-1 token per scored position

    def to_dict(self) -> dict[str, Any]:
        """The figures by name; the reference's only where there was one."""
        out = {k: v for k, v in asdict(self).items() if v is not None or k not in ("base_perplexity", "top1_agreement")}
        out.pop("top1")
        if self.base_perplexity:
            out["perplexity_delta_pct"] = 100 * (self.perplexity / self.base_perplexity - 1)
        return out


def default_window(module: nn.Module, window: int | None = None, stride: int | None = None) -> tuple[int, int]:
    """``(window, stride)``: the given ones, else 512 tokens (never past the model's ``context_length``) and half."""
    window = int(window or min(DEFAULT_WINDOW, int(getattr(module, "context_length", DEFAULT_WINDOW))))
    stride = int(stride or max(1, window // 2))
    if window < 2 or not 1 <= stride <= window:
        raise DataError(f"perplexity needs a window of at least 2 tokens and a stride in 1..window, "
                        f"got window {window}, stride {stride}")
    limit = getattr(module, "context_length", None)
    if limit is not None and window > int(limit):
        raise DataError(f"a window of {window} tokens runs past the model's {limit}-token context: use --window {limit}")
    return window, stride


def token_stream(module: nn.Module, texts: list[str]) -> torch.Tensor:
    """The texts joined with newlines, tokenized once without special tokens (1-d int64)."""
    ids = module.tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]  # type: ignore[operator,union-attr]
    return torch.tensor(ids, dtype=torch.long)


def spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` windows over ``n`` tokens: each scores only its last ``scored`` tokens, so every
    token but the first is predicted exactly once (the first window scores all of its own)."""
    out = [(0, min(window, n), min(window, n))]
    while out[-1][1] < n:
        prev_end = out[-1][1]
        end = min(prev_end + stride, n)
        out.append((max(0, end - window), end, end - prev_end))
    return out


@torch.no_grad()
def lm_scores(module: nn.Module, texts: list[str], window: int | None = None, stride: int | None = None,
              reference: nn.Module | None = None, batch_size: int = 8,
              device: str | torch.device = "cpu", reference_top1: torch.Tensor | None = None) -> LMScores:
    """Token-level perplexity (the "perplexity of fixed-length models" procedure of the Hugging Face docs):
    ``exp`` of the mean negative log-likelihood in nats per scored token; with ``reference`` (the base
    model) also its perplexity and the top-1 next-token agreement on exactly the same windows. The returned
    ``top1`` holds the model's top-1 token at every scored position: passed back as ``reference_top1`` (with
    the same texts, window and stride) it gives ``top1_agreement`` without running the reference again.

    Raises:
        DataError: the text is shorter than two tokens, or the window / stride is invalid.
    """
    window, stride = default_window(module, window, stride)
    ids = token_stream(module, texts)
    if len(ids) < 2:
        raise DataError("perplexity needs a text of at least two tokens")
    models = [module] if reference is None else [module, reference]
    states = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        all_spans = spans(len(ids), window, stride)
        with track(f"perplexity on {len(ids)} tokens", len(all_spans), "windows") as bar:
            nll, top1 = _score_windows(models, ids, all_spans, batch_size, device, bar.advance)
    finally:
        for m, state in zip(models, states, strict=True):
            m.train(state)

    scored = len(top1[0])

    def ppl(total: float) -> float:
        return float(torch.exp(torch.tensor(total / scored)))

    if reference_top1 is not None and len(reference_top1) != scored:
        raise DataError(f"reference_top1 holds {len(reference_top1)} positions, the text {scored}: score the same "
                        "texts with the same window and stride")
    base_top1 = top1[1] if reference is not None else reference_top1
    agreement = None if base_top1 is None else float((top1[0] == base_top1).float().mean())
    return LMScores(ppl(nll[0]), scored, window, stride, ppl(nll[1]) if reference is not None else None, agreement,
                    top1[0])


def _score_windows(models: list[nn.Module], ids: torch.Tensor, all_spans: list[tuple[int, int, int]], batch_size: int,
                   device: str | torch.device, advance: Callable[..., None]) -> tuple[list[float], list[torch.Tensor]]:
    """(summed NLL per model, top-1 token per scored position per model)."""
    nll = [0.0] * len(models)
    top1: list[list[torch.Tensor]] = [[] for _ in models]
    for i in range(0, len(all_spans), batch_size):
        group = all_spans[i : i + batch_size]
        length = max(e - b for b, e, _ in group)
        inputs = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        targets = torch.full((len(group), length), -100, dtype=torch.long)
        for row, (b, e, count) in enumerate(group):
            inputs[row, : e - b] = ids[b:e]
            mask[row, : e - b] = 1
            targets[row, e - b - count : e - b] = ids[e - count : e]
        shifted = targets[:, 1:]  # the first token of a window has no prediction
        keep = shifted != -100
        for k, m in enumerate(models):
            logits = m(input_ids=inputs.to(device), attention_mask=mask.to(device)).float().cpu()[:, :-1]
            nll[k] += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                        ignore_index=-100, reduction="sum"))
            top1[k].append(logits.argmax(-1)[keep])
        advance(len(group))
    return nll, [torch.cat(t) for t in top1]


@torch.no_grad()
def greedy_tokens(module: nn.Module, prompt: torch.Tensor, new_tokens: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The ``new_tokens`` tokens greedy decoding appends to ``prompt`` (1-d ids), recomputing the whole
    sequence each step (a reference procedure, not the fast path)."""
    ids = prompt.to(device).unsqueeze(0)
    limit = int(getattr(module, "context_length", ids.shape[1] + new_tokens))
    out = []
    for _ in range(new_tokens):
        logits = module(input_ids=ids[:, -limit:], attention_mask=torch.ones_like(ids[:, -limit:]))
        nxt = logits[:, -1].float().argmax(-1, keepdim=True)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt], dim=1)
    return torch.tensor(out, dtype=torch.long)


def greedy_agreement(module: nn.Module, reference: nn.Module, texts: list[str], prompts: int = 8,
                     prompt_tokens: int = 32, new_tokens: int = 16, device: str | torch.device = "cpu") -> float:
    """Mean share of a greedy continuation the model generates identically to ``reference`` before the first
    differing token, over ``prompts`` prompts (the first ``prompt_tokens`` tokens of the first texts long
    enough). 1.0: every continuation identical; 0.0: every first token differs.

    Raises:
        DataError: no text has ``prompt_tokens`` tokens.
    """
    chosen = []
    for text in texts:
        ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if len(ids) >= prompt_tokens:
            chosen.append(torch.tensor(ids[:prompt_tokens], dtype=torch.long))
        if len(chosen) == prompts:
            break
    if not chosen:
        raise DataError(f"greedy agreement needs texts of at least {prompt_tokens} tokens")
    shares = []
    was = module.training, reference.training
    module.eval()
    reference.eval()
    try:
        for prompt in chosen:
            ours, base = greedy_tokens(module, prompt, new_tokens, device), greedy_tokens(reference, prompt, new_tokens,
                                                                                         device)
            differ = (ours != base).nonzero()
            shares.append((int(differ[0]) if len(differ) else new_tokens) / new_tokens)
    finally:
        module.train(was[0])
        reference.train(was[1])
    return sum(shares) / len(shares)


GEN_PROMPT, GEN_NEW, GEN_ROUNDS = 128, 32, 3


def generation_speed(module: nn.Module, texts: list[str], baseline: nn.Module | None = None,
                     rounds: int = GEN_ROUNDS) -> dict[str, Any]:
    """Prompt and decode tokens/s at batch 1 with a KV cache (``module.generate``): a prompt of the first
    ``GEN_PROMPT`` tokens of ``texts`` (at most half the context), ``GEN_NEW`` greedy tokens (end of sequence
    ignored), one warm-up then ``rounds`` timed runs; with ``baseline`` the two run interleaved, round by round,
    and ``decode_speedup`` is the median of the per-round ratios.

    Returns ``gen_prompt_tokens``, ``gen_new_tokens``, ``prompt_tokens_per_s``, ``decode_tokens_per_s`` (medians),
    ``decode_tokens_per_s_p10`` / ``_p90``, and with a baseline ``baseline_decode_tokens_per_s`` and
    ``decode_speedup``. Raises DataError when the texts hold no token."""
    length = min(GEN_PROMPT, int(getattr(module, "context_length", 2 * GEN_PROMPT)) // 2)
    ids = module.tokenizer(" ".join(texts[:64]), add_special_tokens=False)["input_ids"][:length]  # type: ignore[operator]
    if not ids:
        raise DataError("generation speed needs at least one token of text")
    runs: dict[str, list[tuple[float, float]]] = {"model": [], "baseline": []}
    models = {"model": module, **({"baseline": baseline} if baseline is not None else {})}
    for round_ in range(rounds + 1):
        for key, lm in models.items():
            result = lm.generate(list(ids), max_new_tokens=GEN_NEW, ignore_eos=True)  # type: ignore[operator]
            if round_:
                runs[key].append((len(ids) / result.prefill_s, (GEN_NEW - 1) / result.decode_s))
    decode = sorted(d for _, d in runs["model"])
    out = {"gen_prompt_tokens": len(ids), "gen_new_tokens": GEN_NEW,
           "prompt_tokens_per_s": round(statistics.median(p for p, _ in runs["model"]), 1),
           "decode_tokens_per_s": round(statistics.median(decode), 1),
           "decode_tokens_per_s_p10": round(decode[0], 1), "decode_tokens_per_s_p90": round(decode[-1], 1)}
    if runs["baseline"]:
        out["baseline_decode_tokens_per_s"] = round(statistics.median(d for _, d in runs["baseline"]), 1)
        out["decode_speedup"] = round(statistics.median(
            a / b for (_, a), (_, b) in zip(runs["model"], runs["baseline"], strict=True)), 3)
    return out

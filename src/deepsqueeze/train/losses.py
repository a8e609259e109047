"""Distillation losses: soft targets (Hinton), hints with an adapter (FitNets), transformer
hidden states and attention maps (TinyBERT / MiniLM), sentence-embedding matching, and a causal LM's
next-token KL to a teacher and cross-entropy on its own tokens.

They live beside the training loop because every stage that learns from a teacher uses them: the
distill stage, QAT's and LoRA's recovery; ``deepsqueeze.distill`` re-exports them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                     temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The ``T^2`` factor keeps the soft-target gradients on the same scale as the hard-label ones
    when the temperature changes. ``labels=None`` (or ``alpha=1``) is pure distillation.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    soft = kl * temperature**2
    if labels is None or alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


class HintAdapter(nn.Module):
    """FitNets regressor: maps a student feature map to the teacher's width (1x1 conv, or Linear for vectors)."""

    def __init__(self, student_dim: int, teacher_dim: int, conv: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(student_dim, teacher_dim, 1) if conv else nn.Linear(student_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, adapter: nn.Module | None = None
              ) -> torch.Tensor:
    """FitNets hint loss: MSE between the (adapted) student feature and the teacher feature.

    Feature maps of different spatial size are matched by adaptive average pooling to the smaller one.
    """
    s = adapter(student_feature) if adapter is not None else student_feature
    t = teacher_feature.detach()
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    if s.shape != t.shape:
        raise ValueError(f"hint shapes differ after the adapter: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    return F.mse_loss(s, t)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      adapter: nn.Module | None = None) -> torch.Tensor:
    """Token-level hidden-state MSE (TinyBERT), over real tokens only, relative to the teacher's mean square.

    Dividing by the teacher's mean square makes layers with large activations (and outlier
    dimensions) comparable to the others.
    """
    s = adapter(student) if adapter is not None else student
    t = teacher.detach()
    if attention_mask is None:
        return F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)
    mask = attention_mask.unsqueeze(-1).to(s.dtype)
    denom = mask.sum() * s.shape[-1]
    mse = ((s - t) ** 2 * mask).sum() / denom.clamp(min=1)
    scale = (t.pow(2) * mask).sum() / denom.clamp(min=1)
    return mse / scale.clamp(min=1e-12)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between attention distributions ``(batch, heads, query, key)`` (MiniLM).

    Rows of padded query tokens are ignored; both maps must have the same number of heads.
    """
    t = teacher_attn.detach().clamp(min=1e-12)
    s = student_attn.clamp(min=1e-12)
    kl = (t * (t.log() - s.log())).sum(-1)  # (batch, heads, query)
    if attention_mask is None:
        return kl.mean()
    mask = attention_mask[:, None, :].to(kl.dtype)
    return (kl * mask).sum() / (mask.sum() * kl.shape[1]).clamp(min=1)


def embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Sentence-embedding distillation: ``1 - cos`` (mean over the batch) or MSE to the teacher's embedding."""
    t = teacher_emb.detach()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student_emb, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student_emb, t)
    raise ValueError(f"unknown embedding loss {kind!r}: use cosine or mse")


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` per position (label logits (B, C), or next-token logits
    (B, L, V) over the positions ``mask`` (B, L) keeps), averaged (Hinton et al., 2015)."""
    if student.dim() == 3 and mask is not None:
        keep = mask.bool()
        student, teacher = student[keep], teacher[keep]
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature ** 2


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-token ``logits`` (B, L, V) against ``ids`` (B, L) shifted by one, over the
    positions whose next token is real (``mask`` (B, L))."""
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])

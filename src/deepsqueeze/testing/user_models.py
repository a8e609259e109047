"""Small random-weight models of the kinds users bring (not the zoo's): every one a ``py:`` factory.

Each exercises one thing the toolkit must cover or account for: transformers' ``Conv1D`` projections
and a tied ``lm_head`` (GPT-2), a ``ConvTranspose2d`` decoder, ``Conv1d`` + ``LSTM`` + ``GRU``,
``nn.MultiheadAttention``, and a detection-style head whose forward returns a dict or a tuple.
All are seeded in the constructor, so two calls give the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ConvTransposeDecoder",
    "DictDetector",
    "MHAEncoder",
    "RecurrentTagger",
    "TiedLM",
    "TupleDetector",
    "gpt2_config",
    "gpt2_lm",
    "gpt2_model",
]


class TiedLM(nn.Module):
    """Embedding (vocab 200 x 32) -> Linear 32x32 -> ``lm_head`` whose weight IS the embedding table."""

    def __init__(self, vocab: int = 200, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.embed(input_ids))))


class ConvTransposeDecoder(nn.Module):
    """A VAE-style decoder: Linear 16 -> 8x4x4, two ConvTranspose2d upsamplings to 1x16x16."""

    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).reshape(-1, 8, 4, 4)
        return self.up2(torch.relu(self.up1(x)))


class RecurrentTagger(nn.Module):
    """Conv1d over a (batch, 8, 24) sequence, then LSTM, GRU and a Linear tagger per step."""

    input_shape = (8, 24)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.gru = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).transpose(1, 2)
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        return self.head(h)


class MHAEncoder(nn.Module):
    """Linear 12 -> 32, ``nn.MultiheadAttention`` (4 heads), Linear 32 -> 6 on (batch, 10, 12)."""

    input_shape = (10, 12)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(h + a)


class _DetectorBody(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, 3, 1)


class DictDetector(_DetectorBody):
    """Two conv layers and two 1x1 heads; forward returns ``{"boxes": ..., "scores": ...}``."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        return {"boxes": self.box(f), "scores": self.cls(f)}


class TupleDetector(_DetectorBody):
    """As :class:`DictDetector`, returning ``(boxes, [scores])``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.backbone(x)
        return self.box(f), [self.cls(f)]


def gpt2_config(**overrides: int) -> object:
    """A tiny GPT-2 config: 2 layers, width 64, 4 heads, vocab 1000, context 64, no cache."""
    from transformers import GPT2Config

    values = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0,
                  eos_token_id=0, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    values.update(overrides)
    return GPT2Config(**values)


def gpt2_lm() -> nn.Module:
    """``GPT2LMHeadModel`` from :func:`gpt2_config`: ``lm_head.weight`` is tied to ``transformer.wte.weight``."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config()).eval()


def gpt2_model() -> nn.Module:
    """``AutoModel.from_config`` on :func:`gpt2_config` (a bare ``GPT2Model``; outputs a ``ModelOutput``)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(gpt2_config()).eval()

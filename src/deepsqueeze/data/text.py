"""Sentences: a user's file (one per line) or English sentences cut from Python's own docs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import DataError

MIN_CHARS, MAX_CHARS = 40, 300
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def load_text_file(path: str) -> TextData:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file {file} does not exist: pass text:FILE with one sentence per line") from None
    except UnicodeDecodeError:
        raise DataError(f"{file} is not UTF-8 text: pass a UTF-8 file with one sentence per line") from None
    except OSError as exc:
        raise DataError(f"cannot read {file}: {exc.strerror}") from None
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"{file} holds no sentences: it needs at least one non-empty line")
    return TextData(f"text:{file}", sentences)


def pydoc_sentences() -> list[str]:
    """Every distinct prose sentence of 40-300 characters in ``pydoc_data.topics``, in a fixed order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    sentences = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in paragraph.splitlines()]
            # Code samples and tables are indented or full of symbols: keep prose paragraphs only.
            if not lines or any(ln.startswith((">>>", "...", "|", "+-", "*")) for ln in lines):
                continue
            flat = " ".join(ln for ln in lines if ln)
            for sentence in _SENTENCE_END.split(flat):
                sentence = sentence.strip()
                if not (MIN_CHARS <= len(sentence) <= MAX_CHARS) or sentence in seen:
                    continue
                if sum(ch.isalpha() or ch.isspace() for ch in sentence) < 0.85 * len(sentence):
                    continue
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def load_pydoc_sentences(split: str | None) -> TextData:
    """Fixed disjoint splits: a sentence's split depends only on a hash of its text.

    ``eval`` (about a third) is for fidelity measurement only and is never used for
    calibration, fine-tuning or distillation; ``calib`` is the rest; ``all`` is both. Inside ``calib``,
    ``val`` (about a quarter of it) is the validation split search scores trials on and ``fit`` the
    rest, which search calibrates and trains on (``calib`` = ``fit`` + ``val``).
    """
    split = split or "eval"
    if split not in ("calib", "eval", "all", "val", "fit"):
        raise DataError(f"unknown pydoc-sentences split {split!r}: use pydoc-sentences:calib, :eval, :val or :fit")
    chosen = [s for s in pydoc_sentences() if split == "all" or split in _split_of(s)]
    return TextData(f"pydoc-sentences:{split}", chosen)


def _split_of(sentence: str) -> tuple[str, ...]:
    """The splits ``sentence`` belongs to: ``("eval",)``, ``("calib", "val")`` or ``("calib", "fit")``."""
    digest = hashlib.sha256(sentence.encode()).digest()
    if digest[0] % 3 == 0:
        return ("eval",)
    return ("calib", "val") if digest[1] % 4 == 0 else ("calib", "fit")

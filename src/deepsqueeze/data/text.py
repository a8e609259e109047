"""Sentences: a user's file (one per line), English sentences cut from Python's own docs, or from the
licence texts every Debian system ships (a second domain: legal prose, never used for calibration)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
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

    return prose_sentences(topics[key] for key in sorted(topics))


LICENSES_DIR = Path("/usr/share/common-licenses")


def license_sentences(folder: Path = LICENSES_DIR) -> TextData:
    """Every distinct prose sentence of 40-300 characters in the licence texts of ``folder`` (Debian's
    ``base-files`` installs them: GPL, LGPL, Apache-2.0, MPL, GFDL, Artistic, BSD, CC0), files in name
    order, each file read once (``GPL`` links to ``GPL-3``).

    Raises:
        DataError: ``folder`` is missing or holds no licence text.
    """
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist (Debian's base-files installs it): use pydoc-sentences or text:FILE")
    seen: set[Path] = set()
    texts = []
    for file in sorted(folder.iterdir()):
        real = file.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        texts.append(real.read_text(encoding="utf-8", errors="replace"))
    sentences = prose_sentences(texts)
    if not sentences:
        raise DataError(f"{folder} holds no licence sentences: use pydoc-sentences or text:FILE")
    return TextData("license-sentences", sentences)


def prose_sentences(texts: Iterable[str]) -> list[str]:
    """Distinct sentences of 40-300 characters from the prose paragraphs of ``texts``, in order."""
    seen: set[str] = set()
    sentences = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
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

"""English prose for language models: the Wikipedia sample and the news corpus that PyPI ``gensim`` 4.4.0
ships as test data (the files only: gensim is never imported).

``wiki:calib|fit|val|eval`` is a fixed article-level split of the 106 articles of
``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (about 500K words once the
markup is stripped): an article's split depends only on a hash of its title, so calibration and training
(``calib`` = ``fit`` + ``val``) never see a sentence of ``eval`` (about a quarter). ``news:eval`` is
``lee_background.cor`` (300 news articles, 60K words), for evaluation only. Items are paragraphs, in file
order; perplexity joins them with newlines into one token stream.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import DataError

GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0 (make install does)"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
WIKI_SPLITS = ("calib", "fit", "val", "eval")
# Bounds on what is read: the shipped files are 6.1 MB (unpacked XML) and 0.36 MB.
MAX_XML_BYTES = 64 << 20
MAX_ARTICLE_CHARS = 2 << 20
MIN_PARAGRAPH_CHARS = 80


def _test_data(name: str) -> Path:
    """The file ``name`` of gensim's test data, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    folder = Path(spec.origin).parent / "test" / "test_data" if spec and spec.origin else None
    if folder is None or not (folder / name).is_file():
        raise DataError(f"the English prose sample ({name}) comes with PyPI gensim 4.4.0, which is not "
                        f"installed: {GENSIM_INSTALL}")
    return folder / name


def wiki_split_of(title: str) -> str:
    """``eval``, ``val`` or ``fit`` for the article called ``title`` (fixed: a hash of the title)."""
    digest = hashlib.sha256(title.encode()).digest()
    if digest[0] % 4 == 0:
        return "eval"
    return "val" if digest[1] % 5 == 0 else "fit"


def load_wiki(split: str | None) -> TextData:
    """Paragraphs of the Wikipedia sample's articles in ``split`` (default ``eval``).

    Raises:
        DataError: an unknown split, or gensim's files are not installed.
    """
    split = split or "eval"
    if split not in WIKI_SPLITS:
        raise DataError(f"unknown wiki split {split!r}: use wiki:calib, wiki:fit, wiki:val or wiki:eval")
    chosen = [p for title, paragraphs in wiki_articles() for p in paragraphs
              if split == wiki_split_of(title) or (split == "calib" and wiki_split_of(title) != "eval")]
    return TextData(f"wiki:{split}", chosen)


def load_news(split: str | None) -> TextData:
    """The news corpus, one item per article (``news:eval``; it is never calibration data).

    Raises:
        DataError: a split other than ``eval``, or gensim's files are not installed.
    """
    if (split or "eval") != "eval":
        raise DataError(f"news has only an eval split (it is never calibration data), got news:{split}")
    text = _test_data(NEWS_FILE).read_text(encoding="utf-8", errors="replace")
    return TextData("news:eval", [line.strip() for line in text.splitlines() if line.strip()])


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(title, paragraphs)`` of every article of the sample (redirects and other namespaces dropped), in
    file order; markup is stripped with mwparserfromhell (templates, references, tables, file links)."""
    try:
        import mwparserfromhell
    except ImportError:
        raise DataError("reading the Wikipedia sample needs mwparserfromhell: pip install 'deepsqueeze[hf]'") from None
    import xml.etree.ElementTree as ET

    with bz2.open(_test_data(WIKI_FILE), "rb") as fh:
        xml = fh.read(MAX_XML_BYTES + 1)
    if len(xml) > MAX_XML_BYTES:
        raise DataError(f"{WIKI_FILE} unpacks to over {MAX_XML_BYTES >> 20} MB: not the sample gensim 4.4.0 ships")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DataError(f"{WIKI_FILE} is not a readable Wikipedia dump ({exc}): reinstall gensim 4.4.0") from None
    articles = []
    for page in root.iter():
        if not page.tag.endswith("}page"):
            continue
        ns, title, text = (page.findtext(f"{{*}}{tag}") for tag in ("ns", "title", "revision/{*}text"))
        if ns != "0" or not title or not text or text.lstrip().lower().startswith("#redirect"):
            continue
        plain = mwparserfromhell.parse(text[:MAX_ARTICLE_CHARS]).strip_code(normalize=True, collapse=True)
        paragraphs = tuple(p for p in (re.sub(r"\s+", " ", line).strip() for line in plain.splitlines())
                           if _is_prose(p))
        if paragraphs:
            articles.append((title, paragraphs))
    return tuple(articles)


def _is_prose(line: str) -> bool:
    """A paragraph of running text: long enough, ends a sentence, no leftover table or link markup."""
    return len(line) >= MIN_PARAGRAPH_CHARS and line[-1] in ".!?\"')" and "|" not in line and "{{" not in line

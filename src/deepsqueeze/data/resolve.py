"""One resolver for every data reference."""

from __future__ import annotations

from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError

DATA_HELP = (
    "fashion-mnist, fashion-mnist:DIR, digits, text:FILE, pydoc-sentences:calib, pydoc-sentences:eval"
)


def resolve_data(ref: str, split: str | None = None) -> ClassificationData | TextData:
    """Load the data named by ``ref``; ``split`` picks a default pydoc-sentences split."""
    name, _, arg = ref.partition(":")
    if name == "fashion-mnist":
        from deepsqueeze.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(arg or None)
    if name == "digits":
        from deepsqueeze.data.digits import load_digits

        return load_digits()
    if name == "text":
        from deepsqueeze.data.text import load_text_file

        if not arg:
            raise DataError("text: needs a file, as in text:sentences.txt (one sentence per line)")
        return load_text_file(arg)
    if name == "pydoc-sentences":
        from deepsqueeze.data.text import load_pydoc_sentences

        return load_pydoc_sentences(arg or split)
    raise DataError(f"unknown data reference {ref!r}: use one of {DATA_HELP}")

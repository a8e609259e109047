"""One resolver for every data reference."""

from __future__ import annotations

from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError

DATA_HELP = (
    "fashion-mnist, fashion-mnist:DIR, fashion-mnist:val, digits, digits:val, text:FILE, pydoc-sentences:calib, "
    "pydoc-sentences:eval, pydoc-sentences:val, pydoc-sentences:fit, license-sentences, wiki:calib, wiki:fit, "
    "wiki:val, wiki:eval, news:eval"
)


def resolve_data(ref: str, split: str | None = None) -> ClassificationData | TextData:
    """Load the data named by ``ref``; ``split`` picks a default pydoc-sentences split.

    Image data with a ``:val`` suffix (``digits:val``, ``fashion-mnist:val``, ``fashion-mnist:DIR:val``) is
    the validation view (:meth:`ClassificationData.validation_view`): training rows minus a fixed held-out
    sixth, which stands as its evaluation split.
    """
    name, _, arg = ref.partition(":")
    view = arg == "val" or arg.endswith(":val")
    if view:
        arg = arg.removesuffix("val").removesuffix(":")
    if name == "fashion-mnist":
        from deepsqueeze.data.fashion_mnist import load_fashion_mnist

        data = load_fashion_mnist(arg or None)
        return data.validation_view() if view else data
    if name == "digits":
        from deepsqueeze.data.digits import load_digits

        if arg:
            raise DataError(f"digits takes no argument but ':val', got {ref!r}")
        data = load_digits()
        return data.validation_view() if view else data
    if name == "text":
        from deepsqueeze.data.text import load_text_file

        if not arg:
            raise DataError("text: needs a file, as in text:sentences.txt (one sentence per line)")
        return load_text_file(arg)
    if name == "pydoc-sentences":
        from deepsqueeze.data.text import load_pydoc_sentences

        return load_pydoc_sentences("val" if view else (arg or split))
    if name == "license-sentences":
        from deepsqueeze.data.text import license_sentences

        if arg:
            raise DataError(f"license-sentences takes no argument, got {ref!r}")
        return license_sentences()
    if name in ("wiki", "news"):
        from deepsqueeze.data.prose import load_news, load_wiki

        return (load_wiki if name == "wiki" else load_news)("val" if view else (arg or split))
    raise DataError(f"unknown data reference {ref!r}: use one of {DATA_HELP}")

"""Resolve any model reference, artifacts included, and the references read from files.

Two doors, by where a reference comes from:

* :func:`resolve_model` takes a reference the user named (a command-line argument, a Python argument):
  it may import the ``py:`` code they named, load the folder they named, train a zoo model.
* :func:`resolve_file_reference` takes a reference read from a file (a recipe's ``model`` or distillation
  ``teacher``, a search space's ``model``): only what deepsqueeze rebuilds from data by itself passes
  (``zoo:NAME``, ``zoo:NAME@DATA`` already trained on this machine, ``minilm``); ``py:`` code, folders,
  artifacts and training runs need the user to name the same reference on the command line.
  An artifact's own reference model is rebuilt from its validated base (:func:`base_reference`), never
  from its free-text ``ref``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from deepsqueeze.artifact import load
from deepsqueeze.core.model import Model
from deepsqueeze.errors import ModelError, one_line
from deepsqueeze.zoo.resolve import ModelCode, check_zoo_reference, resolve_base_model


def resolve_model(ref: str, weights: str | None = None, progress: bool = True,
                  device: str | torch.device = "cpu", model_code: ModelCode = None) -> Model:
    """``FILE.dsq`` loads an artifact (``model_code``: the architecture of a ``py:`` model's artifact,
    see :func:`deepsqueeze.load`); anything else goes to the zoo resolver. ``ref`` must come from the
    user: a reference read from a file goes through :func:`resolve_file_reference`."""
    if ref.endswith(".dsq") or (Path(ref).is_file() and not ref.startswith(("zoo:", "hf:", "gguf:", "py:"))):
        model = load(ref, model_code)
        model.module.to(device)
        return model
    return resolve_base_model(ref, weights=weights, progress=progress, device=device)


def _same_reference(ref: str, named: str) -> bool:
    if ref == named:
        return True
    def kind(text: str) -> str:  # paths compare resolved, within one kind: hf: folders, gguf: files, .dsq files
        return next((p for p in ("hf:", "gguf:") if text.startswith(p)), "")

    prefix = kind(ref)
    if kind(named) != prefix or ref.startswith(("py:", "zoo:")):
        return False
    try:
        return Path(ref.removeprefix(prefix)).resolve() == Path(named.removeprefix(prefix)).resolve()
    except (OSError, ValueError):
        return False


def check_file_reference(ref: str, where: str, named: Iterable[str | None] = (), option: str = "--model") -> None:
    """Refuse (``ModelError``, one line) a model reference read from a file unless deepsqueeze rebuilds it
    from data alone, or the user named the same reference on the command line (``named``).

    ``where`` says which file field holds it ("the recipe's model"), ``option`` the command-line option that
    names it instead. Raises before any work.
    """
    if any(n and _same_reference(ref, n) for n in named):
        return
    shown = one_line(ref, 120)
    if ref.startswith("py:"):
        raise ModelError(f"{where} names {shown}: code runs only when you name it on the command line: "
                         f"pass {option} {shown} yourself if you trust it")
    if ref == "minilm":
        return
    if ref.startswith("zoo:"):
        check_zoo_reference(ref, where, option)
        return
    raise ModelError(f"{where} names {shown}: deepsqueeze loads only the files and folders you name: "
                     f"pass {option} {shown} yourself")


def resolve_file_reference(ref: str, where: str, named: Iterable[str | None] = (), *, option: str = "--model",
                           weights: str | None = None, progress: bool = True, device: str | torch.device = "cpu",
                           model_code: ModelCode = None) -> Model:
    """:func:`resolve_model` for a reference read from a file, after :func:`check_file_reference`."""
    check_file_reference(ref, where, named, option)
    return resolve_model(ref, weights=weights, progress=progress, device=device, model_code=model_code)

"""The exceptions deepsqueeze raises for problems a user can fix.

Every message says what is wrong and what to do about it; the CLI prints it on one
line and exits with code 2.
"""

from __future__ import annotations

import os
import re


class DeepsqueezeError(Exception):
    """Base class: a problem the user can fix (bad input, missing data, unsupported model)."""


class ArtifactError(DeepsqueezeError):
    """A .dsq file is missing, truncated, corrupted, foreign or from a newer format version."""


class RecipeError(DeepsqueezeError, ValueError):
    """A recipe or stage config is invalid: unknown key, wrong type, impossible value."""


class DataError(DeepsqueezeError):
    """A data reference cannot be resolved or its files are missing or malformed."""


class ModelError(DeepsqueezeError):
    """A model reference cannot be resolved, or its weights are missing, malformed or non-finite."""


class NonFiniteLossError(ModelError, FloatingPointError):
    """Training met a NaN or Inf loss; the message names the first layer whose output is not finite."""


class UnsupportedLayerError(ModelError):
    """A technique met a layer or pattern it cannot handle; the message names the layer and why."""


class DeepsqueezeWarning(UserWarning):
    """Warnings deepsqueeze emits (the test suite turns them into errors)."""


class DeepsqueezeDeprecationWarning(DeprecationWarning):
    """An old import path that still works for one release; the message names the new one (the test suite
    turns it into an error: deepsqueeze's own code and tests use the new paths)."""


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<password>[^\s@/]*)@")
_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|KEY|CREDENTIAL|AUTH", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with secrets replaced by ``***``: the password of every ``scheme://user:password@host`` URL
    and the value of every environment variable whose name says it is secret (``*PASSWORD*``, ``*TOKEN*``,
    ``*KEY*``, ...; values of 4 characters or more)."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for name, value in os.environ.items():
        if len(value) >= 4 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def one_line(message: object, limit: int = 600) -> str:
    """``message`` (an exception or text) as one line of at most ``limit`` characters, secrets redacted
    (:func:`redact`), for error messages.

    Library code quotes third-party exceptions with it (torch, safetensors and YAML messages span lines);
    the CLI passes every message through it, so ``error: ...`` on stderr is always exactly one line.
    """
    text = redact(" ".join(str(message).split()))
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."

"""Registry of tensor encodings: how one state-dict tensor becomes bytes in a .dsq and back.

An encoding turns a tensor into a JSON-serializable ``meta`` dict plus a list of byte
segments, and back. The container (``codec.format``) stores shape, dtype, offsets and
checksums; encodings only see the payload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deepsqueeze.errors import ArtifactError

EncodeFn = Callable[..., tuple[dict[str, Any], list[bytes]]]
DecodeFn = Callable[[dict[str, Any], list[bytes], tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Encoding:
    name: str
    encode: EncodeFn  # (tensor, **params) -> (meta, segments)
    decode: DecodeFn  # (meta, segments, shape, dtype) -> tensor


_ENCODINGS: dict[str, Encoding] = {}


def register_encoding(name: str, encode: EncodeFn, decode: DecodeFn) -> Encoding:
    encoding = Encoding(name, encode, decode)
    _ENCODINGS[name] = encoding
    return encoding


def get_encoding(name: str) -> Encoding:
    from deepsqueeze.core.plugins import load_plugins

    load_plugins()
    try:
        return _ENCODINGS[name]
    except KeyError:
        raise ArtifactError(
            f"tensor encoding {name!r} is unknown to this deepsqueeze (known: {', '.join(sorted(_ENCODINGS))}): "
            "the artifact was written by a newer deepsqueeze; upgrade to load it"
        ) from None


def registered_encodings() -> list[str]:
    from deepsqueeze.core.plugins import load_plugins

    load_plugins()
    return sorted(_ENCODINGS)

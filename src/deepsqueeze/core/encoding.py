"""Registry of tensor encodings: how one state-dict tensor becomes bytes in a .dsq and back.

An encoding turns a tensor into a JSON-serializable ``meta`` dict plus a list of byte
segments, and back. The container (``codec.format``) stores shape, dtype, offsets and
checksums; encodings only see the payload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    params: Mapping[str, tuple[type, ...]] = field(default_factory=dict)  # what ``encode`` may be asked

    def check_params(self, params: Mapping[str, Any]) -> str | None:
        """The first problem of ``params`` read from a file (an unknown name, a value of another JSON type;
        ``True`` is not an int), or None."""
        for key, value in params.items():
            types = self.params.get(key)
            if types is None:
                return f"unknown parameter {key[:40]!r} (known: {', '.join(sorted(self.params)) or 'none'})"
            if type(value) not in types:
                return f"parameter {key!r} is a {type(value).__name__}"
        return None


_ENCODINGS: dict[str, Encoding] = {}


def register_encoding(name: str, encode: EncodeFn, decode: DecodeFn,
                      params: Mapping[str, tuple[type, ...]] | None = None) -> Encoding:
    """Register an encoding; ``params``: the keyword parameters ``encode`` takes and their JSON types
    (what a manifest's ``params`` may hold for a tensor of this encoding)."""
    encoding = Encoding(name, encode, decode, dict(params or {}))
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

"""Weight sharing (Deep Compression): k-means codebooks per layer, centroid fine-tuning, and the
codebook / sparse-codebook / entropy-coded tensor encodings.

``share_(model, ShareConfig(...))`` clusters in place; ``encode_(model)`` switches storage to the
entropy-coded forms. Recipe stages: ``share`` and ``encode``.
"""

from __future__ import annotations

from deepsqueeze.codec import codebook as _codebook  # noqa: F401  (registers the codebook encodings)
from deepsqueeze.runtime import CodebookWeight
from deepsqueeze.share.config import EncodeConfig, Method, ShareConfig
from deepsqueeze.share.share import (
    CODEBOOK_ENCODINGS,
    cluster,
    encode_,
    finetune_centroids,
    layer_bits,
    measure,
    payload_bytes,
    share_,
    share_weights_,
    shareable_layers,
)

__all__ = [
    "CODEBOOK_ENCODINGS",
    "CodebookWeight",
    "EncodeConfig",
    "Method",
    "ShareConfig",
    "cluster",
    "encode_",
    "finetune_centroids",
    "layer_bits",
    "measure",
    "payload_bytes",
    "share_",
    "share_weights_",
    "shareable_layers",
]

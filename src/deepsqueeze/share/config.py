"""Typed configs of the weight-sharing stages: ``share`` (k-means codebooks + centroid fine-tuning) and
``encode`` (entropy coding of the shared tensors)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator

from deepsqueeze.codec.entropy import Coder
from deepsqueeze.codec.sparse_index import PositionScheme
from deepsqueeze.core.config import StageConfig
from deepsqueeze.primitives.kmeans import Init


class Method(StrEnum):
    LLOYD = "lloyd"  # Lloyd iterations from the chosen initialisation (Han et al.)
    EXACT = "exact"  # globally optimal 1-D k-means by dynamic programming (init ignored)


class TrainOptimizer(StrEnum):
    ADAM = "adam"
    SGD = "sgd"


class LRSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class ShareConfig(StageConfig):
    """Cluster each Linear/Conv weight's non-zero values into ``2**bits`` shared values, then fine-tune
    the shared values (centroids) with indices fixed and pruned weights held at zero.

    Bits per layer: ``overrides`` (fnmatch on layer names) first, then ``conv_bits`` / ``linear_bits``
    by layer type, then ``bits``. ``epochs: 0`` skips centroid fine-tuning.
    """

    stage_type = "share"

    bits: int = Field(5, ge=1, le=16)
    conv_bits: int | None = Field(None, ge=1, le=16)
    linear_bits: int | None = Field(None, ge=1, le=16)
    overrides: dict[str, int] = Field(default_factory=dict)
    bias_bits: int | None = Field(None, ge=1, le=16, description="also share biases (dense codebook); None: raw")
    init: Init = Init.LINEAR
    method: Method = Method.LLOYD
    iterations: int = Field(30, ge=1, description="Lloyd iterations at most")
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    epochs: float = Field(0.0, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(128, ge=1)
    optimizer: TrainOptimizer = TrainOptimizer.ADAM
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    train_biases: bool = True
    limit: int | None = Field(None, ge=1, description="use at most this many training samples per epoch")

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            if not 1 <= bits <= 16:
                raise ValueError(f"override {pattern!r}: bits must be in 1..16, got {bits}")
        return value


class EncodeConfig(StageConfig):
    """Entropy-code every weight-shared tensor: positions by ``positions`` (``auto`` keeps the smallest of
    entropy-coded gaps and the adaptive bitmap), indices by ``coder`` (``auto``: smaller of Huffman/ANS)."""

    stage_type = "encode"

    positions: PositionScheme = PositionScheme.AUTO
    coder: Coder = Coder.AUTO

"""Typed configs of the weight-sharing stages: ``share`` (k-means codebooks + centroid fine-tuning) and
``encode`` (entropy coding of the shared tensors)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from deepsqueeze.codec.entropy import Coder
from deepsqueeze.codec.sparse_index import PositionScheme
from deepsqueeze.core.config import Bits, Count, Epochs, Flag, LearningRate, StageConfig
from deepsqueeze.primitives.kmeans import Init


class Method(StrEnum):
    LLOYD = "lloyd"  # Lloyd iterations from the chosen initialisation (Han et al.)
    EXACT = "exact"  # globally optimal 1-D k-means by dynamic programming (init ignored)


class FloatStorage(StrEnum):
    FLOAT32 = "float32"  # as trained
    FLOAT16 = "float16"  # rounded to float16 (bfloat16 for a tensor past float16's range), stored in 2 bytes


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

    bits: Bits = 5
    conv_bits: Bits | None = None
    linear_bits: Bits | None = None
    overrides: dict[str, Bits] = Field(default_factory=dict)
    bias_bits: Bits | None = Field(None, description="also share biases (dense codebook); None: raw")
    init: Init = Init.LINEAR
    method: Method = Method.LLOYD
    iterations: Count = Field(30, description="Lloyd iterations at most")
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    epochs: Epochs = 0.0
    lr: LearningRate = 1e-4
    batch_size: Count = 128
    optimizer: TrainOptimizer = TrainOptimizer.ADAM
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    train_biases: Flag = True
    limit: Count | None = Field(None, description="use at most this many training samples per epoch")
    centroid_dtype: FloatStorage = Field(FloatStorage.FLOAT32, description=(
        "float16: the trained centroids rounded to 16-bit floats, stored in 2 bytes (a small layer's 256-entry "
        "codebook is otherwise 1 KB)"))


class EncodeConfig(StageConfig):
    """Entropy-code every weight-shared tensor: positions by ``positions`` (``auto`` keeps the smallest of
    entropy-coded gaps and the adaptive bitmap), indices by ``coder`` (``auto``: smaller of Huffman/ANS);
    ``float_dtype: float16`` also rounds the remaining float tensors to 2 bytes."""

    stage_type = "encode"

    positions: PositionScheme = PositionScheme.AUTO
    coder: Coder = Coder.AUTO
    float_dtype: FloatStorage = Field(FloatStorage.FLOAT32, description=(
        "float16: every other float32 tensor (BatchNorm statistics and affine, unshared biases) rounded to "
        "16-bit floats and stored in 2 bytes; the model is measured as rounded"))

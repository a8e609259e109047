"""Options of quantization-aware training: the ``qat:`` block of a ``quantize`` stage with ``method: qat``.

    - type: quantize
      method: qat
      bits: 4                 # weight bits (uniform levels); group_size for weight-only (act_bits: null)
      qat: {act_bits: 8, epochs: 2, lr: 1e-4, distill: 0.5}

Kept in its own module so the stage config (``deepsqueeze.quant.config``) only names it.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ActQuantizer", "QATInit", "QATOptions", "QATStep", "QATWeights"]


class QATStep(StrEnum):
    ALL = "all"  # prepare -> train -> convert (the recipe stage)
    PREPARE = "prepare"  # install fake-quant modules, initialised from post-training quantization
    CONVERT = "convert"  # replace the fake-quant modules by the integer / packed modules


class QATWeights(StrEnum):
    UNIFORM = "uniform"  # LSQ on a bits-wide integer grid
    BINARY = "binary"  # BinaryConnect / XNOR-Net: sign x per-channel mean |w|
    TERNARY = "ternary"  # TWN: {-1, 0, +1} x per-channel scale
    TTQ = "ttq"  # trained ternary: learned positive and negative scales per channel


class ActQuantizer(StrEnum):
    LSQ = "lsq"  # learned step size (Esser et al. 2020)
    PACT = "pact"  # learned clipping level (Choi et al. 2018)


class QATInit(StrEnum):
    OBSERVER = "observer"  # weights: MSE-best clipping; activations: the stage's observer
    GPTQ = "gptq"  # weight-only transformers: start from GPTQ's codes and group parameters


class QATOptions(BaseModel):
    """How QAT runs. ``act_bits``: 8 (integer execution: ``Int8Linear``/``Int8Conv2d``; static per-tensor
    inputs, or per-token for Linear layers with ``activations: per_token``) or null (weight-only: packed
    modules, float activations). ``first_last_bits``: weight bits of the first and last quantized layer
    (8 by default, as is standard for low-bit networks; null: like the others). ``freeze_bn_after``: epochs
    after which BatchNorm statistics freeze (null: never). ``distill``: weight of the soft-target loss from
    the fp32 model (``deepsqueeze.distill.soft_target_loss``, at ``temperature``); sentence encoders always
    match the fp32 embeddings (cosine), and with ``distill > 0`` also every layer's token hidden states at
    that weight (``deepsqueeze.distill.hidden_state_loss``, TinyBERT), on the training sentences plus
    ``augment`` variants of each (``deepsqueeze.train.text.augment_sentences``). ``lr``, ``epochs``,
    ``batch_size``, ``optimizer``, ``schedule``, ``weight_decay``, ``limit``: the training loop's settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: QATStep = QATStep.ALL
    weights: QATWeights = QATWeights.UNIFORM
    act_bits: int | None = 8
    act_quantizer: ActQuantizer = ActQuantizer.LSQ
    first_last_bits: int | None = 8
    init: QATInit = QATInit.OBSERVER
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(128, ge=1)
    optimizer: str = "adam"
    schedule: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    limit: int | None = Field(None, ge=1)
    freeze_bn_after: float | None = Field(1.0, ge=0)
    distill: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    augment: int = Field(0, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> QATOptions:
        if self.act_bits is not None and self.act_bits != 8:
            raise ValueError(f"act_bits must be 8 (integer execution) or null (weight-only), got {self.act_bits}")
        if self.weights is QATWeights.TTQ and self.act_bits is not None:
            raise ValueError("weights ttq (separate positive and negative scales) is weight-only: set act_bits to null")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 8:
            raise ValueError(f"first_last_bits must be in 2..8 or null, got {self.first_last_bits}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.augment and self.distill == 0:
            raise ValueError("augment adds sentence variants to the distillation data: set distill > 0 too")
        if self.schedule not in ("constant", "cosine", "onecycle"):
            raise ValueError(f"schedule must be constant, cosine or onecycle, got {self.schedule!r}")
        return self

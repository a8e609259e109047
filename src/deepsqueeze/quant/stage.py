"""The ``quantize`` recipe stage: calibration data from the context, then :func:`quantize_`."""

from __future__ import annotations

from typing import Any

from deepsqueeze.core.config import register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.model import Model
from deepsqueeze.quant.api import quantize_
from deepsqueeze.quant.config import Method, QuantizeConfig

CALIBRATED = (Method.STATIC, Method.SMOOTHQUANT, Method.GPTQ, Method.AWQ, Method.MIXED)


@register_stage(QuantizeConfig)
def quantize_stage(model: Model, config: QuantizeConfig, ctx: StageContext) -> None:
    """Quantize ``model.module`` in place; calibrating methods read ``ctx.data`` (never an eval split)."""
    if config.method is Method.QAT:
        from deepsqueeze.quant.qat import qat_stage

        qat_stage(model, config, ctx)
        return
    batches: list[Any] | None = None
    if config.method in CALIBRATED:
        from deepsqueeze.core.calibrate import calibration_batches

        batches = calibration_batches(model, ctx.data, samples=config.calibration_samples)
    layers = quantize_(model.module, config, batches, on_unsupported=ctx.on_unsupported)
    ctx.report.append({"stage": "quantize", "method": config.method.value, "bits": config.bits,
                       "layers": len(layers), "calibration_batches": len(batches) if batches else 0})

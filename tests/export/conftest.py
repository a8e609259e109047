"""Fixtures of the export tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def float_activation_nbits(monkeypatch):
    """``MatMulNBits`` written at accuracy level 0 (float activations): exports then reproduce torch to float
    rounding, so a test can check the graph itself exactly (the default, level 4, rounds activations to int8)."""
    from deepsqueeze.runtime import onnx_forms

    monkeypatch.setattr(onnx_forms, "MATMUL_NBITS_ACCURACY_LEVEL", 0)

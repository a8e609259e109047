"""Calibration asks for N samples; when the data holds fewer it says so with both counts (issue 16)."""

import pytest

from deepsqueeze.core.calibrate import calibration_batches
from deepsqueeze.errors import DeepsqueezeWarning
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle


def test_fewer_calibration_samples_than_asked_warns_with_both_counts():
    model, data = tiny_model_handle(), tiny_classification_data(n_train=48)
    with pytest.warns(DeepsqueezeWarning, match=r"asked for 256 calibration samples but .* has 48"):
        batches = calibration_batches(model, data, samples=256)
    assert sum(len(b.args[0]) for b in batches) == 48


def test_enough_samples_is_silent(recwarn):
    batches = calibration_batches(tiny_model_handle(), tiny_classification_data(n_train=100), samples=64)
    assert sum(len(b.args[0]) for b in batches) == 64
    assert not [w for w in recwarn if issubclass(w.category, DeepsqueezeWarning)]

"""Finding 4 of issue 11: one reader for any forward output."""

import pytest
import torch

from deepsqueeze.core.outputs import output_shapes, output_tensors, primary_output
from deepsqueeze.errors import ModelError
from deepsqueeze.testing.user_models import gpt2_model


def test_nested_containers_flatten_in_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    out = output_tensors({"x": a, "y": (b, None, [c, "label", 3])})
    assert [t.shape[0] for t in out] == [1, 2, 3]
    assert output_shapes((a, {"k": c})) == [(1,), (3,)]
    assert primary_output(a) is a


def test_model_output_first_field_is_primary():
    model = gpt2_model()
    with torch.no_grad():
        out = model(torch.randint(0, 1000, (2, 5)))
    assert primary_output(out) is out.last_hidden_state
    assert output_shapes(out)[0] == (2, 5, 64)


def test_no_tensor_is_a_model_error():
    with pytest.raises(ModelError, match="without any tensor"):
        primary_output({"a": None, "b": "text"})

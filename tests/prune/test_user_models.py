"""Issue 11 findings on users' own models: tied weights (3) and dict/tuple outputs (4) under pruning."""

import pytest
import torch

from deepsqueeze.prune import ChannelPlan, prune_channels_
from deepsqueeze.prune.importance import element_criterion
from deepsqueeze.prune.unstructured import UnstructuredPlan, prune_weights_
from deepsqueeze.testing.user_models import DictDetector, TiedLM, TupleDetector, gpt2_lm

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("factory", [DictDetector, TupleDetector])
def test_structured_pruning_of_dict_and_tuple_outputs(factory):
    model = factory().eval()
    result = prune_channels_(model, X, ChannelPlan(ratio=0.5))
    assert result.params_after < result.params_before
    assert model.backbone[0].out_channels == 4  # the first conv's channels feed only the second conv
    with torch.no_grad():
        out = model(X)
    boxes = out["boxes"] if isinstance(out, dict) else out[0]
    assert boxes.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("factory", [TiedLM, gpt2_lm])
def test_unstructured_pruning_of_tied_weights_uses_one_mask(factory):
    model = factory()
    tied = model.lm_head.weight
    masks = prune_weights_(model, UnstructuredPlan(sparsity=0.5), element_criterion("l1"))
    assert sum(1 for p in masks.params().values() if p is tied) <= 1
    assert model.lm_head.weight is tied
    assert masks.overall_sparsity() == pytest.approx(0.5, abs=0.01)

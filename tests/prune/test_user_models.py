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


def test_unstructured_pruning_covers_every_weight_kind():
    from deepsqueeze.prune.unstructured import prunable_weights
    from deepsqueeze.testing.user_models import ConvTransposeDecoder, MHAEncoder, RecurrentTagger

    names = set()
    for factory in (RecurrentTagger, MHAEncoder, ConvTransposeDecoder):
        names |= set(prunable_weights(factory()))
    assert {"conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_hh_l0", "attn.in_proj_weight",
            "attn.out_proj.weight", "up1.weight", "up2.weight"} <= names
    gpt2 = prunable_weights(gpt2_lm())
    assert "transformer.h.0.attn.c_attn.weight" in gpt2 and "lm_head.weight" not in gpt2


def test_prune_stage_records_coverage_and_masks_tied_weight_once():
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.core.record import get_record
    from deepsqueeze.prune import PruneConfig
    from deepsqueeze.prune.stage import prune_stage
    from deepsqueeze.zoo.resolve import resolve_base_model

    model = resolve_base_model("py:deepsqueeze.testing.user_models:TiedLM", progress=False)
    prune_stage(model, PruneConfig(sparsity=0.5, epochs=0, include=["embed", "proj", "lm_head"]),
                StageContext(model=model))
    m = model.module
    assert m.lm_head.weight is m.embed.weight
    assert float((m.embed.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    coverage = {e.module: e for e in get_record(m).coverage}
    assert coverage["proj"].action == "compressed" and coverage["lm_head"].reason.startswith("tied")

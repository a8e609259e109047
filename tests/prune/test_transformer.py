import copy

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
from deepsqueeze.errors import RecipeError, UnsupportedLayerError
from deepsqueeze.prune import (
    PruneTransformerConfig,
    drop_layers_,
    find_blocks,
    prune_,
    prune_ffn_,
    prune_heads_,
)

pytest.importorskip("transformers")
from deepsqueeze.testing.models import TinyBertEncoder  # noqa: E402

IDS = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))


def _model() -> TinyBertEncoder:
    torch.manual_seed(0)
    return TinyBertEncoder().eval()


def test_removing_heads_and_neurons_equals_zeroing_their_output_weights():
    original = _model()
    pruned = copy.deepcopy(original)
    blocks = find_blocks(pruned)
    assert [b.layer for b in blocks] == [f"transformer.encoder.layer.{i}" for i in range(3)]
    with torch.no_grad():
        for block in blocks:
            kept_heads = prune_heads_(pruned, block, 1)
            kept_neurons = prune_ffn_(pruned, block, 0.5)
            assert len(kept_heads) == 3 and len(kept_neurons) == 32
            attn_out = original.get_submodule(block.attention_out)
            for h in set(range(4)) - set(kept_heads):
                attn_out.weight[:, h * 8:(h + 1) * 8] = 0
            ffn_out = original.get_submodule(block.ffn_out)
            ffn_out.weight[:, sorted(set(range(64)) - set(kept_neurons))] = 0
        torch.testing.assert_close(pruned(IDS), original(IDS), rtol=1e-4, atol=1e-5)
    layer = pruned.transformer.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 3 and layer.attention.self.query.out_features == 24
    # per block: q/k/v lose 3 x (8 x 32 + 8), attention output loses 8 x 32, FFN loses 32 x 32 + 32 + 32 x 32
    assert count_params(original) - count_params(pruned) == 3 * (3 * 264 + 256 + 2080)


def test_stage_with_layer_dropping_round_trips(tmp_path):
    module = _model()
    model = Model(module, py_base(module),
                  Task.SENTENCE_ENCODER, "py:deepsqueeze.testing.models:TinyBertEncoder", count_params(module))
    prune_(model, PruneTransformerConfig(heads=2, ffn_ratio=0.25, drop_layers=["transformer.encoder.layer.1"]))
    assert len(model.module.transformer.encoder.layer) == 2
    save(model, tmp_path / "t.dsq")
    loaded = load(tmp_path / "t.dsq", model=_model)
    assert count_params(loaded.module) == count_params(model.module)
    assert loaded.module.transformer.encoder.layer[1].attention.self.num_attention_heads == 2
    assert torch.equal(loaded.module(IDS), model.module(IDS))


def test_bad_requests_name_the_problem():
    model = _model()
    block = find_blocks(model)[0]
    with pytest.raises(RecipeError, match="keep at least one"):
        prune_heads_(model, block, 4)
    with pytest.raises(UnsupportedLayerError, match="ModuleList"):
        drop_layers_(model, ["transformer.encoder"])
    with pytest.raises(RecipeError, match="l1 or l2"):
        PruneTransformerConfig(criterion="taylor")
    with pytest.raises(UnsupportedLayerError, match="no transformer blocks"):
        prune_(torch.nn.Sequential(torch.nn.Linear(4, 4)), PruneTransformerConfig(heads=1))


@pytest.mark.parametrize("heads, kept", [(0.5, 2), (0.25, 3), (1, 3)])
def test_heads_as_a_count_or_a_fraction_of_each_block(heads, kept):
    """Issue 16, finding 5: ``heads: 0.5`` means half of each block's heads; a non-integer count is an error."""
    module = _model()
    model = Model(module, {"kind": "py", "factory": "deepsqueeze.testing.models:TinyBertEncoder"},
                  Task.SENTENCE_ENCODER, "py:deepsqueeze.testing.models:TinyBertEncoder", count_params(module))
    prune_(model, PruneTransformerConfig(heads=heads))
    assert all(layer.attention.self.num_attention_heads == kept for layer in model.module.transformer.encoder.layer)


def test_a_fractional_head_count_above_one_is_a_clear_error():
    with pytest.raises(RecipeError, match="neither a count of heads .* nor a fraction below 1"):
        PruneTransformerConfig(heads=2.5)

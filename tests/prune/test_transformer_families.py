"""prune_transformer on every family (issue 11, finding 5): heads (GQA-aware), FFN neurons and layers removed,
the pruned model runs and equals the masked reference at float rounding, and the artifact replays it."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from deepsqueeze.artifact import load, save  # noqa: E402
from deepsqueeze.core.counting import count_params  # noqa: E402
from deepsqueeze.errors import RecipeError  # noqa: E402
from deepsqueeze.prune import (  # noqa: E402
    PruneTransformerConfig,
    find_blocks,
    mask_pruned_,
    prune_,
    prune_ffn_,
    prune_heads_,
)
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.testing.hf_models import make_hf_dir  # noqa: E402

FAMILIES = {  # family -> (blocks, query heads, KV heads)
    "bert": (2, 4, 4), "roberta": (2, 4, 4), "distilbert": (2, 4, 4), "albert": (1, 4, 4),
    "gpt2": (2, 4, 4), "llama": (2, 4, 2), "qwen2": (2, 4, 2),
}
SENTENCES = ["A first sentence for the pruned model.", "Second, shorter one.", "and a third sentence here"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfp")
    return {f: resolve_model(f"hf:{make_hf_dir(f, root / f)}", progress=False) for f in FAMILIES}


def _out(module, inputs):
    with torch.no_grad():
        return module(**inputs)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("heads", [1, 2])
def test_pruned_model_equals_the_masked_reference(models, family, heads):
    model = models[family]
    n_blocks, n_heads, n_kv = FAMILIES[family]
    if heads % n_kv and n_kv < n_heads:
        pytest.skip("GQA refuses uneven groups (test_gqa_counts)")
    reference, pruned = copy.deepcopy(model.module), copy.deepcopy(model.module)
    blocks = find_blocks(pruned)
    assert len(blocks) == n_blocks and all(b.heads == n_heads and b.kv_heads == n_kv for b in blocks)
    for block, ref_block in zip(blocks, find_blocks(reference), strict=True):
        kept_heads = prune_heads_(pruned, block, heads)
        kept_neurons = prune_ffn_(pruned, block, 0.3)
        assert len(kept_heads) == n_heads - heads
        if n_kv < n_heads:  # GQA: 2 heads of 4 in 2 groups = one per group; 1 head is refused earlier
            assert block.kv_heads == n_kv and block.heads == n_heads - heads
        mask_pruned_(reference, ref_block, kept_heads, kept_neurons)
    inputs = pruned.tokenize(SENTENCES)
    torch.testing.assert_close(_out(pruned, inputs), _out(reference, inputs), rtol=1e-4, atol=1e-5)
    assert count_params(pruned) < count_params(model.module)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_counts(models, family):
    """4 query heads in 2 KV groups: 2 removed = one per group; 1 removed is refused (a group would be
    uneven) in one message naming the counts that work."""
    pruned = copy.deepcopy(models[family].module)
    block = find_blocks(pruned)[0]
    with pytest.raises(RecipeError, match="grouped-query attention"):
        prune_heads_(pruned, block, 1)
    kept = prune_heads_(pruned, block, 2)
    assert len(kept) == 2 and {h // 2 for h in kept} == {0, 1}  # one survivor in each group
    attn = pruned.get_submodule(block.attention)
    assert attn.num_key_value_groups == 1 and attn.k_proj.out_features == 2 * block.head_dim


def test_gqa_whole_groups(tmp_path):
    """8 query heads in 4 KV groups of 2: removing 2 (not a multiple of 4) takes one whole KV group."""
    from deepsqueeze.testing.hf_models import FAMILIES as HF

    cls, cfg, kwargs, tok = HF["llama"]
    HF["llama-8"] = (cls, cfg, {**kwargs, "num_attention_heads": 8, "num_key_value_heads": 4}, tok)
    try:
        model = resolve_model(f"hf:{make_hf_dir('llama-8', tmp_path / 'l8')}", progress=False)
    finally:
        del HF["llama-8"]
    reference, pruned = copy.deepcopy(model.module), copy.deepcopy(model.module)
    for block, ref_block in zip(find_blocks(pruned), find_blocks(reference), strict=True):
        kept = prune_heads_(pruned, block, 2)
        assert block.kv_heads == 3 and len(kept) == 6 and len({h // 2 for h in kept}) == 3
        mask_pruned_(reference, ref_block, kept, None)
    inputs = pruned.tokenize(SENTENCES)
    torch.testing.assert_close(_out(pruned, inputs), _out(reference, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "gpt2", "llama"])
def test_stage_with_layer_dropping_round_trips_through_the_artifact(models, tmp_path, family):
    model = copy.deepcopy(models[family])
    stack = {"distilbert": "transformer.transformer.layer", "gpt2": "transformer.transformer.h",
             "llama": "transformer.model.layers"}[family]
    prune_(model, PruneTransformerConfig(heads=2, ffn_ratio=0.25, drop_layers=[f"{stack}.1"]))
    assert len(model.module.get_submodule(stack)) == 1
    save(model, tmp_path / "p.dsq")
    loaded = load(tmp_path / "p.dsq")
    assert count_params(loaded.module) == count_params(model.module)
    inputs = model.module.tokenize(SENTENCES)
    torch.testing.assert_close(_out(loaded.module, inputs), _out(model.module, inputs))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_drop_blocks_removes_the_block_that_changes_its_input_least(tmp_path, family):
    """Issue 30: block removal by measured importance (Block Influence, ShortGPT). A block whose output
    projections are zero passes its input through unchanged (pre-norm residual): it has influence 0, it is the
    one removed, and the model without it computes exactly what it computed with it."""
    from deepsqueeze.data.datasets import TextData
    from deepsqueeze.recipes.run import run_stages
    from deepsqueeze.recipes.schema import parse_recipe

    model = resolve_model(f"hf:{make_hf_dir(family, tmp_path / family, num_hidden_layers=4)}", progress=False)
    stack = {"gpt2": "transformer.transformer.h", "llama": "transformer.model.layers"}[family]
    idle = model.module.get_submodule(f"{stack}.2")
    with torch.no_grad():
        for name, p in idle.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight", "c_proj.bias")):
                p.zero_()
    inputs = model.module.tokenize(SENTENCES)
    before = _out(model.module, inputs)
    data = TextData("text:calib", SENTENCES * 4)
    ctx = run_stages(model, parse_recipe({"stages": [{"type": "prune_transformer", "drop_blocks": 1,
                                                      "calibration_samples": 8}]}), data, progress=False)
    row = ctx.report[-1]
    assert row["dropped"] == [f"{stack}.2"]
    assert row["block_influence"][f"{stack}.2"] == pytest.approx(0, abs=1e-6)
    assert min(v for k, v in row["block_influence"].items() if k != f"{stack}.2") > 1e-4
    assert len(model.module.get_submodule(stack)) == 3
    torch.testing.assert_close(_out(model.module, inputs), before, rtol=1e-4, atol=1e-5)
    save(model, tmp_path / "d.dsq")
    torch.testing.assert_close(_out(load(tmp_path / "d.dsq").module, inputs), before, rtol=1e-4, atol=1e-5)


def test_drop_blocks_is_refused_before_any_work_where_it_cannot_hold(models, tmp_path):
    from deepsqueeze.testing.models import tiny_model_handle

    with pytest.raises(RecipeError, match="keep at least one"):
        PruneTransformerConfig(drop_blocks=2).preflight(models["llama"])
    with pytest.raises(RecipeError, match="keep at least one"):
        PruneTransformerConfig(drop_blocks=1, drop_layers=["transformer.model.layers.0"]).preflight(models["llama"])
    from deepsqueeze.errors import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match="sentences"):
        PruneTransformerConfig(drop_blocks=1).preflight(tiny_model_handle())
    assert PruneTransformerConfig(drop_blocks=1).needs_data() and not PruneTransformerConfig().needs_data()

"""One-shot LLM pruning: SparseGPT and Wanda as algorithms, the ``prune_oneshot`` stage on a tiny decoder, and
joint sparsity + GPTQ (pruned weights stay exactly zero)."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.data.datasets import TextData
from deepsqueeze.errors import RecipeError
from deepsqueeze.eval.metrics import perplexity
from deepsqueeze.prune import PruneOneShotConfig, magnitude_mask, sparsegpt_prune, wanda_mask
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.hf_models import make_hf_dir


def _layer_problem(seed: int = 0, rows: int = 24, cols: int = 64, n: int = 2048):
    """A weight and inputs whose features have very different scales and are correlated (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    X = (torch.randn(n, cols, generator=g) @ mix) * scales
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.T @ X / n


def _output_error(W: torch.Tensor, pruned: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ W.T - X @ pruned.T) ** 2).mean())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_beats_magnitude_on_layer_output_error(nm):
    W, X, H = _layer_problem()
    new, mask = sparsegpt_prune(W, H, 0.5, nm, block_size=32)
    wanda = W * wanda_mask(W, H, 0.5, nm)
    magnitude = W * magnitude_mask(W, 0.5, nm)
    assert torch.equal(new == 0, ~mask) or bool((new[~mask] == 0).all())
    errors = [_output_error(W, p, X) for p in (new, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_masks_have_the_asked_pattern(nm):
    W, _, H = _layer_problem(1)
    for mask in (sparsegpt_prune(W, H, 0.5, nm, block_size=32)[1], wanda_mask(W, H, 0.5, nm),
                 magnitude_mask(W, 0.5, nm)):
        assert mask.dtype == torch.bool and mask.shape == W.shape
        if nm:
            assert bool((mask.reshape(W.shape[0], -1, nm[1]).sum(-1) == nm[0]).all())
        else:
            assert abs(float((~mask).float().mean()) - 0.5) < 0.02
    per_row = (~wanda_mask(W, H, 0.25)).sum(1)
    assert bool((per_row == 16).all()), "wanda compares weights within each output row"


def test_sparsegpt_keeps_every_unpruned_column_when_sparsity_is_zero():
    W, _, H = _layer_problem(2)
    new, mask = sparsegpt_prune(W, H, 0.0)
    assert bool(mask.all()) and torch.allclose(new, W, atol=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_dir("llama", tmp_path_factory.mktemp("llama") / "m")


def _text() -> TextData:
    words = "the cat sat on a mat while the dog ran in the park and the bird sang over the tree".split()
    g = torch.Generator().manual_seed(0)
    return TextData("text:calib", [" ".join(words[int(i)] for i in torch.randint(len(words), (24,), generator=g))
                                   for _ in range(48)])


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_stage_prunes_a_decoder_and_the_artifact_round_trips(method, llama_dir, tmp_path):
    _prune_and_round_trip(f"hf:{llama_dir}", method, 2 * 7, "mlp.up_proj", tmp_path)


def test_gpt2_conv1d_layers_are_pruned_as_linear_layers(tmp_path):
    folder = make_hf_dir("gpt2", tmp_path / "gpt2")
    _prune_and_round_trip(f"hf:{folder}", "sparsegpt", 2 * 4, "mlp.c_fc", tmp_path)


def _prune_and_round_trip(ref: str, method: str, layers: int, probe: str, tmp_path) -> None:
    model = resolve_model(ref, progress=False)
    data = _text()
    recipe = parse_recipe({"stages": [
        {"type": "prune_oneshot", "method": method, "pattern": "2:4", "calibration_samples": 16}]})
    ctx = run_stages(model, recipe, data, progress=False)
    report = ctx.report[-1]
    assert report["stage"] == "prune_oneshot" and report["sparsity"] == 0.5
    assert report["layers"] == layers, "every Linear of the two blocks, lm_head excluded"
    inner = model.module.get_submodule(next(n for n, m in model.module.named_modules() if n.endswith(probe)))
    assert float((inner.weight == 0).float().mean()) == 0.5
    lm_head = next(m for n, m in model.module.named_modules() if n.endswith("lm_head"))
    assert not bool((lm_head.weight == 0).any())
    ppl, _ = perplexity(model.module, data.sentences[:8], window=64, stride=32)
    assert torch.isfinite(torch.tensor(ppl))
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded.module(input_ids=ids), model.module(input_ids=ids))


def test_two_four_then_gptq_keeps_the_pruned_weights_at_zero(llama_dir):
    model = resolve_model(f"hf:{llama_dir}", progress=False)
    recipe = parse_recipe({"stages": [
        {"type": "prune_oneshot", "method": "sparsegpt", "pattern": "2:4", "calibration_samples": 16,
         "storage": "dense"},
        {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 16}]})
    run_stages(model, recipe, _text(), progress=False)
    packed = [m for n, m in model.module.named_modules() if type(m).__name__ == "PackedIntLinear"
              and "lm_head" not in n]
    assert packed
    for layer in packed:
        weight = layer.dequantized_weight()
        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), "GPTQ must keep the 2:4 zeros"


def test_two_four_refuses_widths_that_are_not_multiples_of_four(tmp_path):
    folder = make_hf_dir("llama", tmp_path / "odd", hidden_size=66, num_attention_heads=3, num_key_value_heads=3)
    model = resolve_model(f"hf:{folder}", progress=False)
    recipe = parse_recipe({"stages": [
        {"type": "prune_oneshot", "method": "magnitude", "pattern": "2:4"}]})
    with pytest.raises(RecipeError, match="multiples of 4"):
        run_stages(model, recipe, None, progress=False)


def test_calibrating_methods_need_data():
    assert PruneOneShotConfig(method="sparsegpt").needs_data()
    assert not PruneOneShotConfig(method="magnitude").needs_data()

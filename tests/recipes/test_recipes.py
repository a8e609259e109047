import pytest
import yaml

from deepsqueeze.artifact import load
from deepsqueeze.errors import ArtifactError, DataError, RecipeError
from deepsqueeze.eval import accuracy
from deepsqueeze.recipes import compress, load_recipe, parse_recipe
from deepsqueeze.recipes.schema import shipped_recipes_dir


def test_every_shipped_recipe_validates():
    files = sorted(shipped_recipes_dir().glob("*.yaml"))
    assert files, "no shipped recipes found"
    for file in files:
        recipe = load_recipe(file)
        assert recipe.stages, file.name
        assert parse_recipe(recipe.to_dict(), file.name) == recipe


def test_bare_name_finds_a_shipped_recipe():
    assert load_recipe("finetune").stages[0].stage_type == "finetune"


def test_typo_in_a_stage_key_names_the_stage_and_the_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"type": "finetune", "epochs": 1}, {"type": "finetune", "lrr": 0.1}]}))
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    message = str(info.value)
    assert "stage 2" in message and "'lrr'" in message and "did you mean 'lr'" in message and "allowed keys" in message
    assert "\n" not in message


@pytest.mark.parametrize("text, match", [
    ("stages: []", "non-empty list"),
    ("model: zoo:lenet300\nstagse: []", "unknown top-level key 'stagse'"),
    ("stages: [{type: finetune}]\nseed: abc", "seed"),
    ("stages: [{type: finetune\n", "YAML"),
    ("- just a list", "mapping"),
])
def test_malformed_recipes_are_one_line_recipe_errors(tmp_path, text, match):
    file = tmp_path / "r.yaml"
    file.write_text(text)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(file)
    assert "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_finetune_only_recipe_round_trips_and_scores_the_same(tmp_path, digits):
    recipe = parse_recipe({"stages": [{"type": "finetune", "epochs": 1, "lr": 1e-4, "limit": 256}]})
    out = tmp_path / "ft.dsq"
    result = compress("zoo:lenet300@digits", recipe, out, progress=False)
    assert out.stat().st_size == result.artifact_bytes
    assert result.compression_ratio == pytest.approx(4 * result.model.base_params / result.artifact_bytes)
    loaded = load(out)
    assert accuracy(loaded.module, digits) == result.metrics["accuracy"]
    assert loaded.meta["manifest"]["stages"][0]["type"] == "finetune"


def test_same_recipe_and_seed_give_the_same_bytes(tmp_path):
    recipe = parse_recipe({"seed": 3, "stages": [{"type": "finetune", "epochs": 1, "limit": 128}]})
    compress("zoo:lenet300@digits", recipe, tmp_path / "a.dsq", progress=False)
    compress("zoo:lenet300@digits", recipe, tmp_path / "b.dsq", progress=False)
    assert (tmp_path / "a.dsq").read_bytes() == (tmp_path / "b.dsq").read_bytes()


def test_compress_refuses_bad_outputs_and_eval_text(tmp_path):
    recipe = parse_recipe({"stages": [{"type": "finetune", "epochs": 1}]})
    with pytest.raises(ArtifactError, match=".dsq"):
        compress("zoo:lenet300@digits", recipe, tmp_path / "out.pt", progress=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        compress("zoo:lenet300@digits", recipe, tmp_path / "no" / "out.dsq", progress=False)
    with pytest.raises(RecipeError, match="no model"):
        compress(None, recipe, tmp_path / "out.dsq", progress=False)
    with pytest.raises(DataError, match="evaluation only"):
        compress("zoo:lenet300@digits", recipe, tmp_path / "out.dsq", "pydoc-sentences:eval", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("later", [
    {"type": "quantize", "method": "rtn", "bits": 4, "group_size": None},
    {"type": "lowrank", "rule": "fixed", "rank": 8, "conv": "none"},
])
def test_a_stage_replacing_a_pruned_layer_drops_its_stale_sparse_encoding(tmp_path, digits, later):
    """Prune (sparse storage) then a stage that replaces the layers: the artifact saves and reloads exactly,
    and the user is told the sparse storage no longer applies (it used to vanish without a word)."""
    import torch

    from deepsqueeze.errors import DeepsqueezeWarning

    recipe = parse_recipe({"stages": [{"type": "prune", "sparsity": 0.8, "storage": "sparse"}, later]})
    with pytest.warns(DeepsqueezeWarning, match="lose the sparse storage"):
        result = compress("zoo:lenet300@digits", recipe, tmp_path / "m.dsq", "digits", progress=False)
    loaded = load(tmp_path / "m.dsq")
    x = digits.test_x[:32]
    with torch.no_grad():
        assert torch.equal(loaded.module(x), result.model.module(x))


def test_finetune_after_full_quantization_is_a_recipe_error(tmp_path):
    """Nothing left to train is a one-line user error naming the fix, not a ValueError traceback."""
    recipe = parse_recipe({"stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": None},
                                      {"type": "finetune", "epochs": 0.5}]})
    with pytest.raises(RecipeError, match="put the training stage before it"):
        compress("zoo:lenet300@digits", recipe, tmp_path / "m.dsq", "digits", progress=False)
    assert not (tmp_path / "m.dsq").exists()


def test_min_steps_raises_the_epochs_of_training_stages_on_small_data():
    """Issue 29: recipes count training in epochs; on the bundled digits (11 steps per epoch at batch 128)
    deep-compression-lenet5's 4 + 2 epochs were 66 steps and the demo showed LeNet-5 losing 7 pp."""
    from deepsqueeze.data.resolve import resolve_data
    from deepsqueeze.recipes.run import at_least_steps
    from deepsqueeze.recipes.schema import parse_recipe

    recipe = parse_recipe({"min_steps": 400, "stages": [
        {"type": "prune", "sparsity": 0.5, "schedule": "agp", "epochs": 4, "agp_end": 0.6},
        {"type": "finetune", "epochs": 2, "batch_size": 64, "limit": 640},
        {"type": "quantize", "method": "rtn", "bits": 4},
        {"type": "finetune", "epochs": 1000}]})
    assert recipe.to_dict()["min_steps"] == 400
    digits = resolve_data("digits")
    steps = -(-len(digits.train_x) // 128)
    raised = [at_least_steps(stage, recipe.min_steps, digits) for stage in recipe.stages]
    assert raised[0].epochs == -(-400 // steps) and raised[0].sparsity == 0.5
    assert raised[1].epochs == 40  # 640 samples at batch 64: 10 steps per epoch
    assert raised[2] is recipe.stages[2] and raised[3] is recipe.stages[3]  # no training / long enough
    assert at_least_steps(recipe.stages[0], None, digits) is recipe.stages[0]
    with pytest.raises(RecipeError, match="min_steps"):
        parse_recipe({"min_steps": 0, "stages": [{"type": "finetune"}]})


def test_zoo_models_train_at_least_the_minimum_steps(monkeypatch):
    """Issue 29: zoo:lenet5@digits trained 6 epochs of 11 steps (66 steps) and scored 89.5% on digits."""
    from deepsqueeze.data.resolve import resolve_data
    from deepsqueeze.zoo import pretrained

    seen = {}
    monkeypatch.setattr(pretrained, "train_classifier", lambda module, data, **kw: seen.update(kw))
    digits = resolve_data("digits")
    pretrained.train_zoo_model("lenet5", digits, progress=False)
    assert seen["epochs"] * -(-len(digits.train_x) // seen["batch_size"]) >= pretrained.MIN_TRAINING_STEPS
    pretrained.train_zoo_model("lenet5", digits, progress=False, epochs=2)
    assert seen["epochs"] == 2  # an explicit --epochs is kept

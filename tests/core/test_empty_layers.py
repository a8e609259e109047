"""A zero-size layer (``nn.Linear(32, 0)``) is skipped by every technique: nothing to compress in it.

Issue 15, finding 5: ``int8-dynamic`` raised ValueError and ``prune-agp`` ZeroDivisionError on such a layer.
Every stage of every shipped recipe, and every registered stage with its defaults, runs here on a model
holding one; each either compresses the rest (the empty layer stays as it was and the artifact round-trips)
or stops with a DeepsqueezeError about something else (e.g. ``encode`` without ``share``), never a crash.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core.config import config_from_dict, registered_stages
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
from deepsqueeze.core.walker import has_empty_weight, iter_modules
from deepsqueeze.errors import DeepsqueezeError, DeepsqueezeWarning
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import Recipe, shipped_recipes_dir
from deepsqueeze.testing.models import tiny_classification_data


class WithEmptyLayer(nn.Module):
    def __init__(self, side: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.input_shape, self.num_classes = (1, side, side), classes
        self.fc1 = nn.Linear(side * side, 32)
        self.empty = nn.Linear(32, 0)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        return torch.cat([self.fc2(h), self.empty(h)], dim=1)


def make() -> nn.Module:
    torch.manual_seed(0)
    return WithEmptyLayer()


def make_digits() -> nn.Module:
    torch.manual_seed(0)
    return WithEmptyLayer(side=8, classes=10)


def stages() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(shipped_recipes_dir().glob("*.yaml")):
        for i, stage in enumerate(yaml.safe_load(path.read_text())["stages"]):
            stage = dict(stage)
            if "epochs" in stage:
                stage["epochs"] = 1
            if "calibration_samples" in stage:
                stage["calibration_samples"] = 16
            out.append((f"{path.stem}[{i}]", stage))
    out += [(f"default-{name}", {"type": name}) for name in registered_stages()]
    return out


STAGES = stages()


def test_walker_leaves_empty_layers_out():
    model = make()
    assert has_empty_weight(model.empty) and not has_empty_weight(model.fc1)
    assert [n for n, _ in iter_modules(model, types=nn.Linear)] == ["fc1", "fc2"]
    assert [n for n, _ in iter_modules(model, types=nn.Linear, skip_empty=False)] == ["fc1", "empty", "fc2"]


@pytest.mark.parametrize("stage", [s for _, s in STAGES], ids=[i for i, _ in STAGES])
def test_every_stage_skips_a_zero_size_layer(stage, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ds_empty_layer", sys.modules[__name__])
    module = make()
    model = Model(module, py_base(module), Task.CLASSIFIER,
                  "py:ds_empty_layer:make", count_params(module), module.input_shape, 4)
    data = tiny_classification_data(n_train=128, n_test=32)
    try:
        with warnings.catch_warnings():  # a stage that finds nothing it handles says so; not this test's subject
            warnings.simplefilter("ignore", DeepsqueezeWarning)
            run_stages(model, Recipe(stages=(config_from_dict(stage),)), data, progress=False)
    except DeepsqueezeError as exc:
        assert "empty" not in str(exc).replace("ds_empty_layer", "")  # the layer, not the model's name
        return
    # still a plain Linear with no weights (prune_channels may narrow its inputs with its producer's outputs);
    # a zoo: student (distill-lenet300) replaces the whole architecture, so only the round trip is checked
    if not str(stage.get("student", "self")).startswith("zoo:"):
        assert type(model.module.empty) is nn.Linear and model.module.empty.weight.numel() == 0
    x = data.test_x[:4]
    expected = model.module.eval()(x)
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq", model=make).module.eval()
    assert torch.allclose(loaded(x), expected, atol=1e-5)


def test_compress_through_the_cli(tmp_path, monkeypatch, capsys):
    from deepsqueeze.cli.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ds_empty_layer", sys.modules[__name__])
    Path("agp.yaml").write_text("stages:\n  - type: prune\n    schedule: agp\n    sparsity: 0.9\n    epochs: 1\n"
                                "    limit: 64\n    storage: sparse\n    execution: sparse_csr\n")
    for recipe in ("int8-dynamic", "agp.yaml"):
        with pytest.raises(SystemExit) as info:
            main(["compress", "--model", "py:ds_empty_layer:make_digits", "--recipe", recipe, "--data", "digits",
                  "--out", "o.dsq", "--json"])
            sys.exit(0)
        assert (info.value.code or 0) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert load("o.dsq", model="py:ds_empty_layer:make_digits").module.empty.weight.shape == (0, 32)

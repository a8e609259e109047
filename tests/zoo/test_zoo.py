import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deepsqueeze.core import Task, count_params
from deepsqueeze.errors import ModelError
from deepsqueeze.resolve import resolve_model
from deepsqueeze.zoo import ZOO, build_zoo_model


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", list(ZOO))
def test_builders_adapt_to_the_input_shape(name, shape):
    model = build_zoo_model(name, shape, 7).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_architectures_have_the_published_sizes():
    assert count_params(build_zoo_model("lenet300", (1, 28, 28), 10)) == 266_610
    assert count_params(build_zoo_model("lenet5", (1, 28, 28), 10)) == 431_080
    assert 500_000 < count_params(build_zoo_model("vgg-small", (1, 28, 28), 10)) < 1_000_000


def test_zoo_model_trains_once_and_is_cached(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(tmp_path))
    first = resolve_model("zoo:lenet300@digits", progress=False)
    files = list((tmp_path / "zoo").glob("*.safetensors"))
    assert len(files) == 1
    second = resolve_model("zoo:lenet300@digits", progress=False)
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert first.base == {"kind": "zoo", "name": "lenet300", "input_shape": [1, 8, 8], "num_classes": 10,
                          "data": "digits"}
    from deepsqueeze.eval import accuracy

    assert accuracy(first.module, digits) > 0.85


def test_zoo_training_is_deterministic(tmp_path, monkeypatch):
    weights = []
    for i in range(2):
        monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(tmp_path / str(i)))
        weights.append(resolve_model("zoo:lenet300@digits", progress=False).module[1].weight)
    assert torch.equal(*weights)


def test_minilm_has_the_published_parameter_count(minilm):
    assert minilm.task is Task.SENTENCE_ENCODER
    assert minilm.base_params == count_params(minilm.module) == 22_713_216


def test_hf_directory_matches_sentence_transformers(minilm):
    from deepsqueeze.zoo import minilm_dir

    model = resolve_model(f"hf:{minilm_dir()}", progress=False)
    sentences = ["A quick brown fox jumps over the lazy dog.", "Python has dictionaries."]
    ours = model.module.encode(sentences)
    assert torch.allclose(ours, minilm.module.encode(sentences))
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(sentences, convert_to_tensor=True)
    assert torch.allclose(ours, reference.cpu(), atol=1e-5)


def test_py_factory_with_safetensors_weights(tmp_path, monkeypatch):
    module = types.ModuleType("ds_test_factory")
    module.make = lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ds_test_factory", module)
    source = module.make()
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = resolve_model("py:ds_test_factory:make", weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.module[1].weight, source[1].weight)
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model("py:ds_test_factory:make", weights=str(tmp_path / "w.pt"))
    save_file({"1.weight": torch.full((2, 4), float("nan")), "1.bias": torch.zeros(2)}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelError, match="NaN"):
        resolve_model("py:ds_test_factory:make", weights=str(tmp_path / "nan.safetensors"))
    save_file({"other": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match="do not fit"):
        resolve_model("py:ds_test_factory:make", weights=str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("ref,match", [
    ("zoo:resnet9000", "unknown zoo model"),
    ("tf:model", "unknown model reference"),
    ("py:no_such_module_xyz:f", "cannot import"),
    ("py:os:no_such_factory", "has no"),
    ("py:justamodule", "py:package.module:factory"),
    ("hf:/no/such/dir", "not a Hugging Face model directory"),
])
def test_bad_model_references(ref, match):
    with pytest.raises(ModelError, match=match):
        resolve_model(ref, progress=False)

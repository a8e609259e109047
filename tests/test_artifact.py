import copy

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core import record_transform, register_transform, set_submodule
from deepsqueeze.errors import ArtifactError, ModelError
from deepsqueeze.eval import accuracy


def test_save_load_is_bit_exact_and_scores_the_same(tmp_path, lenet300_digits, digits):
    size = save(lenet300_digits, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    assert size == (tmp_path / "m.dsq").stat().st_size
    for (k, a), (k2, b) in zip(lenet300_digits.module.state_dict().items(), loaded.module.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    assert accuracy(loaded.module, digits) == accuracy(lenet300_digits.module, digits)
    assert loaded.base == lenet300_digits.base and loaded.base_params == lenet300_digits.base_params


def test_same_model_same_bytes(tmp_path, lenet300_digits):
    save(lenet300_digits, tmp_path / "a.dsq")
    save(lenet300_digits, tmp_path / "b.dsq")
    assert (tmp_path / "a.dsq").read_bytes() == (tmp_path / "b.dsq").read_bytes()


def test_structural_transforms_are_replayed(tmp_path, lenet300_digits, digits):
    @register_transform("test-shrink-linear")
    def _shrink(root, target, params):
        set_submodule(root, target, torch.nn.Linear(params["in"], params["out"]))

    model = copy.deepcopy(lenet300_digits)
    set_submodule(model.module, "5", torch.nn.Linear(100, 10))
    record_transform(model.module, "test-shrink-linear", "5", **{"in": 100, "out": 10})
    save(model, tmp_path / "t.dsq")
    loaded = load(tmp_path / "t.dsq")
    assert torch.equal(loaded.module[5].weight, model.module[5].weight)
    assert accuracy(loaded.module, digits) == accuracy(model.module, digits)


def test_never_overwrites_the_input_artifact(tmp_path, lenet300_digits):
    save(lenet300_digits, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    before = (tmp_path / "m.dsq").read_bytes()
    with pytest.raises(ArtifactError, match="overwrite"):
        save(loaded, tmp_path / "m.dsq")
    assert (tmp_path / "m.dsq").read_bytes() == before


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path, lenet300_digits):
    model = copy.deepcopy(lenet300_digits)
    with torch.no_grad():
        model.module[1].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        save(model, tmp_path / "nan.dsq")
    assert not (tmp_path / "nan.dsq").exists()


def test_unknown_transform_is_an_artifact_error(tmp_path, lenet300_digits):
    from deepsqueeze.codec.format import TensorEntry, read_artifact, write_artifact

    save(lenet300_digits, tmp_path / "m.dsq")
    contents = read_artifact(tmp_path / "m.dsq")
    manifest = {k: v for k, v in contents.manifest.items() if k not in ("tensors", "format", "version")}
    manifest["transforms"] = [{"kind": "from-the-future", "target": "1", "params": {}}]
    write_artifact(tmp_path / "f.dsq", manifest, [TensorEntry(k, v) for k, v in contents.tensors.items()])
    with pytest.raises(ArtifactError, match="upgrade"):
        load(tmp_path / "f.dsq")


def test_a_loaded_model_saves_again_with_the_same_encodings(tmp_path, lenet300_digits):
    from deepsqueeze.codec.encodings import bytes_to_tensor, tensor_to_bytes
    from deepsqueeze.core import record_encoding
    from deepsqueeze.core.encoding import register_encoding

    def encode(tensor, scale):
        return {"scale": scale}, [tensor_to_bytes((tensor * scale).to(torch.float16))]

    def decode(meta, segments, shape, dtype):
        return bytes_to_tensor(segments[0], shape, torch.float16).to(dtype) / meta["scale"]

    register_encoding("test-half", encode, decode, {"scale": (int,)})
    model = copy.deepcopy(lenet300_digits)
    record_encoding(model.module, "1.weight", "test-half", scale=2)
    first = save(model, tmp_path / "a.dsq")
    again = save(load(tmp_path / "a.dsq"), tmp_path / "b.dsq")
    assert again == first
    assert load(tmp_path / "b.dsq").meta["manifest"]["tensors"][0]["params"] == {"scale": 2}


def test_loaded_model_is_called_like_the_original(tmp_path, lenet300_digits, digits):
    """Issue 16, finding 3: ``deepsqueeze.load(path)(x)`` runs the model; metadata stays reachable."""
    import torch

    import deepsqueeze as ds

    ds.save(lenet300_digits, tmp_path / "m.dsq")
    model = ds.load(tmp_path / "m.dsq")
    x = digits.test_x[:5]
    with torch.no_grad():
        assert torch.equal(model(x), lenet300_digits.module(x))
    assert model.ref == lenet300_digits.ref and model.meta["artifact_bytes"] == (tmp_path / "m.dsq").stat().st_size
    with pytest.raises(ds.ModelError, match="not a sentence encoder"):
        model.encode(["a sentence"])


def test_encoder_handle_encodes_like_its_module(minilm):
    import torch

    sentences = ["a loaded model is called like the original", "second sentence"]
    assert torch.equal(minilm.encode(sentences), minilm.module.encode(sentences))

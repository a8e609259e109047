"""Every field read from a file is validated against the model it describes, and bounded before work
(issue 25, findings 5 and 6): forged manifests that pass every checksum end in one ``ArtifactError`` at
load, never in a model that fails in forward, computes NaN, or a load that runs for minutes."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core.record import record_encoding
from deepsqueeze.errors import ArtifactError, RecipeError
from deepsqueeze.quant import Int8DynamicConfig, quantize_
from deepsqueeze.testing.forge import assemble_artifact, forge_manifest, split_artifact
from deepsqueeze.testing.models import TINY_SHAPE, tiny_model_handle

TINY = "py:deepsqueeze.testing.models:TinyMLP"


@pytest.fixture
def plain(tmp_path):
    save(tiny_model_handle(), tmp_path / "plain.dsq")
    return tmp_path / "plain.dsq"


@pytest.fixture
def sparse(tmp_path):
    model = tiny_model_handle()
    with torch.no_grad():
        model.module.fc1.weight[model.module.fc1.weight.abs() < 0.1] = 0
    record_encoding(model.module, "fc1.weight", "sparse")
    save(model, tmp_path / "sparse.dsq")
    return tmp_path / "sparse.dsq"


def _forged(src, tmp_path, edit):
    return forge_manifest(src, tmp_path / "forged.dsq", edit)


def test_a_tie_must_join_tensors_of_the_same_shape_and_dtype(tmp_path, plain):
    def edit(m):
        m["tensors"] = [t for t in m["tensors"] if t["name"] != "fc2.bias"]
        m["ties"] = {"fc2.bias": "fc1.bias"}  # 16 elements tied to 32

    with pytest.raises(ArtifactError, match="ties"):
        load(_forged(plain, tmp_path, edit), model=TINY)


@pytest.mark.parametrize("key", ["encoding", "model", "tensor_name", "scale"])
def test_tensor_params_are_the_encodings_own(tmp_path, plain, key):
    def edit(m):
        m["tensors"][0]["params"] = {key: "x"}

    with pytest.raises(ArtifactError, match="parameter"):
        load(_forged(plain, tmp_path, edit), model=TINY)


@pytest.mark.parametrize("value", [["uint8"], {"a": 1}, 7, None])
def test_sparse_meta_of_another_json_type_is_refused(tmp_path, sparse, value):
    def edit(m):
        entry = next(t for t in m["tensors"] if t["name"] == "fc1.weight")
        entry["meta"]["col_dtype"] = value
        entry["meta"]["layout"] = "csr"

    with pytest.raises(ArtifactError):
        load(_forged(sparse, tmp_path, edit), model=TINY)


@pytest.mark.parametrize("shape", [[1, 4, 5], [3, 4, 4], [16], [1, 1, 1, 16]])
def test_input_shape_must_fit_the_model(tmp_path, plain, shape):
    def edit(m):
        m["input_shape"] = shape

    path = _forged(plain, tmp_path, edit)
    if shape == [16] or shape == [1, 1, 1, 16]:  # flattened to 16 features: the model takes it
        assert load(path, model=TINY).module(torch.zeros(2, *shape)).shape == (2, 4)
        return
    with pytest.raises(ArtifactError, match="does not run"):
        load(path, model=TINY)


def test_num_classes_must_fit_the_model(tmp_path, plain):
    with pytest.raises(ArtifactError, match="classes"):
        load(_forged(plain, tmp_path, lambda m: m.update(num_classes=10)), model=TINY)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, plain, value):
    version, manifest_bytes, payload = split_artifact(plain.read_bytes())
    manifest = json.loads(manifest_bytes)
    entry = next(t for t in manifest["tensors"] if t["name"] == "fc1.weight")
    offset = entry["segments"][0][0]
    payload = payload[:offset] + struct.pack("<f", value) + payload[offset + 4:]
    import zlib

    entry["segments"][0][2] = zlib.crc32(payload[offset:offset + entry["segments"][0][1]])
    (tmp_path / "nan.dsq").write_bytes(assemble_artifact(manifest, payload, version))
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        load(tmp_path / "nan.dsq", model=TINY)


def test_an_overflowing_int8_scale_is_refused_at_load(tmp_path):
    model = tiny_model_handle()
    quantize_(model.module, Int8DynamicConfig())
    layer = model.module.fc1
    scale = next(name for name, _ in layer.named_buffers() if "scale" in name)
    getattr(layer, scale).fill_(3.4e38)  # finite, but scale x code overflows float32
    save(model, tmp_path / "huge.dsq")
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        load(tmp_path / "huge.dsq", model=TINY)


@pytest.mark.parametrize("count, needle", [(2_000, "entries"), (200_000, "out of proportion")])
@pytest.mark.parametrize("key", ["coverage", "transforms"])
def test_manifest_lists_are_bounded_by_the_model(tmp_path, plain, key, count, needle):
    entry = ({"stage": 0, "stage_type": "quantize", "module": "fc1", "kind": "Linear", "weights": 1, "action": "kept"}
             if key == "coverage" else {"kind": "cut", "target": "fc1", "params": {}})

    def edit(m):
        m[key] = [entry] * count

    path = _forged(plain, tmp_path, edit)
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match=needle):
        load(path, model=TINY)
    assert time.perf_counter() - start < 60  # a correctness bound, not a timing claim: minutes before


def test_a_grid_space_is_counted_before_it_is_listed():
    from deepsqueeze.search.space import parse_space

    for stage in ({"type": "quantize", "method": "rtn", "group_size": {"low": 8, "high": 10**12}},
                  {"type": "prune", "sparsity": {"low": 0.0, "high": 0.9, "step": 1e-12}}):
        data = {"stages": [stage]}
        space = parse_space(data, lambda *_: [], source="space")
        with pytest.raises(RecipeError, match="grid"):
            space.grid()
    data = {"stages": [{"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [2, 3, 4, 8]}}}]}
    space = parse_space(data, lambda *_: [f"l{i}" for i in range(40)], source="space")
    with pytest.raises(RecipeError, match="grid points"):
        space.grid()


def test_a_shape_the_probe_cannot_feed_is_not_a_crash(tmp_path, plain):
    assert tuple(load(plain, model=TINY).input_shape) == TINY_SHAPE


@pytest.mark.parametrize("edit", ["drop-padding", "bool-stride", "wrong-groups"])
def test_a_quantized_conv_replay_needs_its_whole_geometry_with_strict_types(tmp_path, edit):
    """Issue 25 finding 5: only the geometry keys present were checked (a deleted padding took the
    constructor default) and ``stride: [true, 1]`` passed because ``True == 1``."""
    from deepsqueeze.quant import Int8StaticConfig
    from deepsqueeze.testing.quant_models import tiny_bn_convnet_handle

    model = tiny_bn_convnet_handle()
    g = torch.Generator().manual_seed(0)
    quantize_(model.module, Int8StaticConfig(), [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)])
    save(model, tmp_path / "conv.dsq")

    def forge(m):
        t = next(t for t in m["transforms"] if t["kind"] == "quant.module" and "padding" in t["params"])
        if edit == "drop-padding":
            del t["params"]["padding"]
        elif edit == "bool-stride":
            t["params"]["stride"] = [True, True]
        else:
            t["params"]["groups"] = 2

    forged = _forged(tmp_path / "conv.dsq", tmp_path, forge)
    with pytest.raises(ArtifactError):
        load(forged, model="py:deepsqueeze.testing.quant_models:TinyBNConvNet")


def test_a_finite_weight_near_the_float_limit_is_refused_at_load(tmp_path):
    """Found by the fuzzer (tests/fuzz, payload kind): a resealed 3.4e38 in fc3 passed the one-input probe
    (the ReLU before it was closed, or its input below 1) and the loaded model computed Inf on the next input."""
    x = torch.randn(256, *TINY_SHAPE, generator=torch.Generator().manual_seed(5))
    for j in range(16):
        model = tiny_model_handle()
        with torch.no_grad():
            model.module.fc2.weight.mul_(3)  # activations into fc3 around 1, as in the fuzzed (coded) seed
            model.module.fc3.weight[0, j] = 3.4028e38  # float32 max: any activation above 1 overflows
        save(model, tmp_path / "huge.dsq")
        try:
            loaded = load(tmp_path / "huge.dsq", model=TINY)
        except ArtifactError as exc:
            assert "NaN or Inf" in str(exc)
            continue
        with torch.no_grad():  # a model that loads computes finite outputs on ordinary inputs
            assert torch.isfinite(loaded.module(x)).all(), f"fc3.weight[0, {j}] = 3e38 loaded and overflowed"


def test_outputs_near_the_float_limit_on_the_probe_are_refused(tmp_path):
    model = tiny_model_handle()
    with torch.no_grad():  # each weight below any bound on stored values; their product is not
        model.module.fc1.weight.mul_(1e12)
        model.module.fc3.weight.mul_(1e12)
    save(model, tmp_path / "big.dsq")
    with pytest.raises(ArtifactError, match="probe"):
        load(tmp_path / "big.dsq", model=TINY)

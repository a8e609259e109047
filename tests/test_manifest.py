"""One validated manifest (issue 15 finding 2): forged but checksum-valid manifests are ArtifactErrors
that name the field, and a model whose forward would fail is refused at load."""

import subprocess
import sys

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.errors import ArtifactError
from deepsqueeze.quant import Int8DynamicConfig, quantize_
from deepsqueeze.testing.forge import forge_manifest
from deepsqueeze.testing.models import tiny_model_handle

TINY = "py:deepsqueeze.testing.models:TinyMLP"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("m")
    plain = tiny_model_handle()
    save(plain, tmp / "plain.dsq")
    quant = tiny_model_handle()
    quantize_(quant.module, Int8DynamicConfig())
    save(quant, tmp / "int8.dsq")
    return tmp


def _forge(saved, tmp_path, name, edit):
    return forge_manifest(saved / name, tmp_path / "forged.dsq", edit)


def _tensor(manifest, name):
    return next(t for t in manifest["tensors"] if t["name"] == name)


def _first_float(manifest):
    return next(t for t in manifest["tensors"] if t["dtype"] == "float32" and len(t["shape"]) == 2)


def _set(path, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


CASES = {
    "missing base_params": (lambda m: m.pop("base_params"), "base_params"),
    "huge int": (_set(["base_params"], 10**4000), "malformed"),
    "bool as int": (_set(["num_classes"], True), "num_classes"),
    "task unknown": (_set(["task"], "regressor"), "task"),
    "unknown field": (_set(["run_on_load"], "os:system"), "run_on_load"),
    "transform not a dict": (_set(["transforms"], ["prune_channels"]), "transforms"),
    "transform kind wrong type": (_set(["transforms"], [{"kind": ["x"], "target": "0", "params": {}}]), "kind"),
    "tensor name wrong type": (lambda m: m["tensors"][0].update(name=7), "name"),
    "stages deep": (_set(["stages"], [{"a": _nested(40)}]), "malformed"),
    "ties to nothing": (_set(["ties"], {"fc.weight": "nope"}), "ties"),
    "coverage wrong type": (_set(["coverage"], [{"stage": "x"}]), "coverage"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_fields_are_artifact_errors(saved, tmp_path, case):
    edit, needle = CASES[case]
    with pytest.raises(ArtifactError, match=needle):
        load(_forge(saved, tmp_path, "plain.dsq", edit), model=TINY)


def test_shape_mismatch_is_an_artifact_error_not_a_runtime_error(saved, tmp_path):
    def edit(manifest):
        entry = _first_float(manifest)
        rows, cols = entry["shape"]
        entry["shape"] = [cols, rows]  # same bytes, transposed claim: load_state_dict raised RuntimeError

    with pytest.raises(ArtifactError, match="does not fit"):
        load(_forge(saved, tmp_path, "plain.dsq", edit), model=TINY)


def test_raw_dtype_change_is_refused(saved, tmp_path):
    def edit(manifest):
        _first_float(manifest)["dtype"] = "int32"  # same size: used to load as a silently wrong model

    with pytest.raises(ArtifactError, match="int32"):
        load(_forge(saved, tmp_path, "plain.dsq", edit), model=TINY)


def _quant_transform(manifest):
    return next(t for t in manifest["transforms"] if t["kind"] == "quant.module")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("in_features", 10**6, "in_features"),      # would allocate a 10**6-wide layer
    ("in_features", -3, "in_features"),
    ("cls", "os.system", "cls"),
    ("act", "exec", "act"),
    ("bias", "yes", "bias"),
])
def test_forged_quant_transform_params_are_refused(saved, tmp_path, field, value, needle):
    def edit(manifest):
        _quant_transform(manifest)["params"][field] = value

    with pytest.raises(ArtifactError, match=needle):
        load(_forge(saved, tmp_path, "int8.dsq", edit), model=TINY)


def test_forged_scales_that_would_break_forward_are_refused(saved, tmp_path):
    from deepsqueeze.testing.forge import assemble_artifact, split_artifact

    data = (saved / "int8.dsq").read_bytes()
    version, manifest_bytes, payload = split_artifact(data)
    import json
    import zlib

    manifest = json.loads(manifest_bytes)
    entry = next(t for t in manifest["tensors"] if t["name"].endswith("weight_scale"))
    offset, length, _ = entry["segments"][0]
    bad = bytearray(payload)
    bad[offset : offset + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    entry["segments"][0][2] = zlib.crc32(bytes(bad[offset : offset + length]))
    (tmp_path / "nan.dsq").write_bytes(assemble_artifact(manifest, bytes(bad), version))
    with pytest.raises(ArtifactError, match="scale"):
        load(tmp_path / "nan.dsq", model=TINY)


@pytest.mark.parametrize("keep", [[-1, 0], [1, 1], [0, 10**6], [], "0"])
def test_forged_kept_indices_are_refused(tmp_path, keep):
    from deepsqueeze.prune.surgery import cut_

    model = tiny_model_handle()
    cut_(model.module, "fc1", "out", list(range(0, 32, 2)))
    cut_(model.module, "fc2", "in", list(range(0, 32, 2)))
    save(model, tmp_path / "s.dsq")
    assert load(tmp_path / "s.dsq", model=TINY).module.fc1.out_features == 16

    def edit(manifest):
        manifest["transforms"][0]["params"]["keep"] = keep

    with pytest.raises(ArtifactError, match="keep"):
        load(forge_manifest(tmp_path / "s.dsq", tmp_path / "f.dsq", edit), model=TINY)


def test_zoo_base_out_of_proportion_fails_fast(tmp_path, lenet300_digits):
    save(lenet300_digits, tmp_path / "z.dsq")

    def edit(manifest):
        manifest["base"]["input_shape"] = [1, 1024, 1024]  # a 300M-parameter LeNet-300 from a small file

    with pytest.raises(ArtifactError, match="input_shape"):
        load(forge_manifest(tmp_path / "z.dsq", tmp_path / "f.dsq", edit))


def test_cli_prints_one_line_for_a_forged_manifest(saved, tmp_path):
    forged = _forge(saved, tmp_path, "plain.dsq", _set(["base_params"], -5))
    proc = subprocess.run([sys.executable, "-m", "deepsqueeze", "inspect", str(forged), "--model-code", TINY],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "base_params" in proc.stderr

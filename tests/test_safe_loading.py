"""A .dsq never names code to run (issue 15, finding 1): loading is data-only.

Forged manifests pass every checksum, so only the loader's rules stand between them and the process.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.codec.format import FORMAT_VERSION
from deepsqueeze.errors import ArtifactError, ModelError
from deepsqueeze.testing.forge import forge_manifest
from deepsqueeze.testing.models import tiny_model_handle

TINY = "py:deepsqueeze.testing.models:TinyMLP"


@pytest.fixture
def tiny_artifact(tmp_path):
    model = tiny_model_handle()
    save(model, tmp_path / "tiny.dsq")
    return model, tmp_path / "tiny.dsq"


def _cli(cwd, *argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "deepsqueeze", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env=env)


def _assert_one_line(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("factory", ["os:abort", "sys:exit", "code:interact", "evil_local_module:run"])
@pytest.mark.parametrize("version", sorted({1, FORMAT_VERSION}))
def test_a_manifest_naming_code_never_runs_it(tmp_path, tiny_artifact, factory, version):
    _, path = tiny_artifact
    (tmp_path / "evil_local_module.py").write_text(textwrap.dedent("""
        import pathlib
        pathlib.Path("pwned").write_text("imported")
        def run():
            pathlib.Path("pwned").write_text("called")
    """))

    def edit(manifest):
        manifest["base"] = {"kind": "py", "factory": factory}

    forged = forge_manifest(path, tmp_path / "forged.dsq", edit, version=version)
    proc = _cli(tmp_path, "evaluate", str(forged), "--data", "digits", "--no-latency")
    _assert_one_line(proc, "model-code" if version == 1 else "base")
    assert not (tmp_path / "pwned").exists()


def test_py_artifacts_need_model_code_from_the_caller(tiny_artifact):
    model, path = tiny_artifact
    with pytest.raises(ModelError, match="--model-code py:"):
        load(path)
    loaded = load(path, model=TINY)
    x = torch.randn(4, *model.input_shape)
    assert torch.equal(loaded.module(x), model.module(x))
    assert torch.equal(load(path, model=type(model.module)).module(x), model.module(x))
    assert "factory" not in loaded.base and "TinyMLP" not in path.read_bytes().split(b"\n")[0].decode("latin-1")


def test_model_code_must_build_the_recorded_architecture(tiny_artifact):
    _, path = tiny_artifact
    with pytest.raises(ModelError, match="builds"):
        load(path, model="py:deepsqueeze.testing.block_models:TinyBlockNet")

    def widened():
        module = tiny_model_handle().module
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        first.weight = torch.nn.Parameter(torch.zeros(first.out_features, first.in_features + 1))
        return module

    with pytest.raises(ModelError, match="shape"):
        load(path, model=widened)


def test_cli_loaders_take_model_code(tmp_path, tiny_artifact):
    _, path = tiny_artifact
    _assert_one_line(_cli(tmp_path, "inspect", str(path)), "--model-code")
    proc = _cli(tmp_path, "inspect", str(path), "--model-code", TINY, "--json")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("base", [
    {"kind": "zoo", "name": "os", "input_shape": [1, 28, 28], "num_classes": 10},
    {"kind": "zoo", "name": "lenet300", "input_shape": [1, 28, 10**9], "num_classes": 10},
    {"kind": "zoo", "name": "lenet300", "input_shape": [1, 28, -3], "num_classes": 10},
    {"kind": "zoo", "name": "lenet300", "input_shape": [1, 28, 28], "num_classes": True},
    {"kind": "zoo", "name": ["lenet300"], "input_shape": [1, 28, 28], "num_classes": 10},
    {"kind": "hf", "path": {"__class__": "os.system"}},
    {"kind": "minilm", "factory": "os:abort"},
    {"kind": "py", "fingerprint": {"modules": [], "tensors": [["w", [-1]]]}},
    {"kind": "plugin", "module": "os"},
    "zoo:lenet300",
])
def test_built_in_bases_are_validated_data(tmp_path, tiny_artifact, base):
    _, path = tiny_artifact

    def edit(manifest):
        manifest["base"] = base

    forged = forge_manifest(path, tmp_path / "forged.dsq", edit)
    with pytest.raises(ArtifactError, match="base"):
        load(forged, model=TINY)

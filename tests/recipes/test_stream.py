"""compress --stream: a sharded Hugging Face decoder quantized block by block, in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepsqueeze as ds
from deepsqueeze.errors import RecipeError
from deepsqueeze.recipes import load_recipe
from deepsqueeze.recipes.run import compress
from deepsqueeze.recipes.stream import compress_streaming
from deepsqueeze.testing.big_models import llama_config, write_random_llama

RTN = {"stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32, "calibration_samples": 8}]}


def _recipe(tmp_path: Path, stages: dict) -> object:
    file = tmp_path / "r.yaml"
    file.write_text(json.dumps(stages))
    return load_recipe(file)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    write_random_llama(folder, llama_config(hidden=64, layers=3, intermediate=128), shard_bytes=60_000)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def test_streamed_artifact_equals_in_memory_and_runs(tmp_path: Path, sharded_llama: Path) -> None:
    recipe = _recipe(tmp_path, RTN)
    ref = f"hf:{sharded_llama}"
    compress(ref, recipe, tmp_path / "memory.dsq", "pydoc-sentences:calib", progress=False)
    result = compress_streaming(ref, recipe, tmp_path / "stream.dsq", "pydoc-sentences:calib", progress=False)
    assert result.artifact_bytes == (tmp_path / "stream.dsq").stat().st_size
    memory, streamed = ds.load(tmp_path / "memory.dsq").module, ds.load(tmp_path / "stream.dsq").module
    a, b = memory.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    tokens = streamed.tokenize(["Streaming keeps one block in memory."])
    torch.testing.assert_close(streamed(**tokens), memory(**tokens))


def test_stream_refuses_recipes_that_need_the_whole_model(tmp_path: Path, sharded_llama: Path) -> None:
    recipe = _recipe(tmp_path, {"stages": [{"type": "quantize", "method": "dynamic"}]})
    with pytest.raises(RecipeError, match="weight-only"):
        compress_streaming(f"hf:{sharded_llama}", recipe, tmp_path / "x.dsq", "pydoc-sentences:calib")
    assert not (tmp_path / "x.dsq").exists()


PEAK = """
import json, resource, sys
from deepsqueeze.recipes import load_recipe
from deepsqueeze.recipes.stream import compress_streaming
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
compress_streaming(sys.argv[1], load_recipe(sys.argv[2]), sys.argv[3], "pydoc-sentences:calib", progress=False)
print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_peak_memory_grows_with_the_layer_not_the_depth(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(RTN))
    peaks = {}
    for layers in (2, 6):
        folder = tmp_path / f"l{layers}"
        params = write_random_llama(folder, llama_config(hidden=384, layers=layers, intermediate=1536), shard_bytes=8 << 20)
        run = subprocess.run([sys.executable, "-c", PEAK, f"hf:{folder}", str(recipe), str(tmp_path / f"{layers}.dsq")],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = (json.loads(run.stdout.strip().splitlines()[-1])["peak_kb"] * 1024, params)
    layer_fp32 = 4 * (peaks[6][1] - peaks[2][1]) / 4
    growth = peaks[6][0] - peaks[2][0]
    # four more layers held in memory would add 4 x layer_fp32 (and more in a fp32 model); streamed: under one
    assert growth < layer_fp32, (growth / 2**20, layer_fp32 / 2**20)


def test_cli_stream_refuses_non_hf_models_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepsqueeze.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--stream", "--model", "zoo:lenet5", "--recipe", "w4-rtn", "--out", str(tmp_path / "x.dsq")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf:DIR" in err
    assert not list(tmp_path.iterdir())

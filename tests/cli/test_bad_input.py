"""Issue 15, finding 5: each bad input is one line on stderr and exit code 2, never a traceback.

Most cases run ``main(argv)`` in-process; the first ones run the installed console script in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deepsqueeze.testing.cli import run

FINETUNE = "stages:\n  - type: finetune\n    epochs: 1\n    limit: 64\n"




def assert_one_line(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def run_script(console_script: list[str], folder: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}
    return subprocess.run([*console_script, *argv], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


# -------------------------------------------------------------------------------- user code (py: models)

BROKEN_CODE = {
    "raises_on_import": ("raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom second line"),
    "syntax_error": ("def make(:\n    pass\n", "SyntaxError"),
    "exits_on_import": ("import sys\nsys.exit(0)\n", "SystemExit"),
    "factory_raises": ("def make():\n    raise ValueError('bad width')\n", "ValueError: bad width"),
    "factory_not_module": ("def make():\n    return 42\n", "not a torch.nn.Module"),
    "not_callable": ("make = 3\n", "no callable 'make'"),
}


def test_py_module_that_raises_on_import_through_the_console_script(tmp_path, console_script):
    write_module(tmp_path, "ds_boom_sub", BROKEN_CODE["raises_on_import"][0])
    (tmp_path / "ft.yaml").write_text(FINETUNE)
    proc = run_script(console_script, tmp_path, "compress", "--model", "py:ds_boom_sub:make",
                      "--recipe", "ft.yaml", "--out", "o.dsq", "--data", "digits")
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, "py:ds_boom_sub:make", "RuntimeError")
    assert not (tmp_path / "o.dsq").exists()


@pytest.mark.parametrize("case", sorted(BROKEN_CODE))
def test_py_model_code_that_fails(capsys, workdir, monkeypatch, case):
    source, needle = BROKEN_CODE[case]
    name = f"ds_broken_{case}"
    write_module(workdir, name, source)
    monkeypatch.syspath_prepend(str(workdir))
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert_one_line(*run(capsys, "inspect", f"py:{name}:make"), f"py:{name}:make", needle)


# ----------------------------------------------------------------------------------------------- weights

def test_safetensors_weights_of_the_wrong_shape(capsys, workdir, monkeypatch):
    write_module(workdir, "ds_mlp_shape", "from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n")
    monkeypatch.syspath_prepend(str(workdir))
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(2)}, str(workdir / "w.safetensors"))
    assert_one_line(*run(capsys, "inspect", "py:ds_mlp_shape:make", "--weights", "w.safetensors"),
                    "w.safetensors", "weight has shape [3, 4]", "expects [2, 4]")


def test_cached_checkpoint_of_the_wrong_shape_is_one_line(capsys, workdir, monkeypatch):
    from deepsqueeze.zoo.pretrained import checkpoint_path

    monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(workdir / "cache"))
    path = checkpoint_path("lenet300", "digits")
    path.parent.mkdir(parents=True)
    state = {k: torch.zeros(v.shape[::-1]) for k, v in nn.Linear(64, 300).state_dict().items()}
    save_file({"fc1." + k: v for k, v in state.items()}, str(path))
    assert_one_line(*run(capsys, "inspect", "zoo:lenet300@digits"), str(path), "delete it to retrain")


def test_hf_folder_with_only_pickle_weights_is_refused_unread(capsys, workdir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    folder = workdir / "bert"
    folder.mkdir()
    config.save_pretrained(folder)
    torch.save(transformers.BertModel(config).state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on an untrusted folder")

    monkeypatch.setattr(torch, "load", no_unpickling)
    assert_one_line(*run(capsys, "inspect", f"hf:{folder}"), "pytorch_model.bin", "safetensors")


# ---------------------------------------------------------------------------------------------- --out

def test_out_that_is_a_folder_is_refused_before_any_work(tmp_path, console_script):
    (tmp_path / "ft.yaml").write_text(FINETUNE)
    (tmp_path / "out.dsq").mkdir()
    # the model reference is bad too: the --out check must come first, before anything is resolved or run
    for out in ("out.dsq", "."):
        proc = run_script(console_script, tmp_path, "compress", "--model", "zoo:lenet9000", "--recipe", "ft.yaml",
                          "--out", out)
        assert_one_line(proc.returncode, proc.stdout, proc.stderr, "is a folder")


def test_out_in_a_read_only_location_is_refused_before_any_work(capsys, workdir):
    (workdir / "ft.yaml").write_text(FINETUNE)
    # /sys refuses new files even to root (a chmod'ed folder would not stop root, who runs CI)
    assert_one_line(*run(capsys, "compress", "--model", "zoo:lenet9000", "--recipe", "ft.yaml",
                         "--out", "/sys/out.dsq"), "cannot write /sys/out.dsq")
    assert not list(workdir.glob(".*"))


# ------------------------------------------------------------------------------------------- messages

def test_every_error_message_is_collapsed_to_one_line(capsys, workdir, monkeypatch):
    import deepsqueeze.recipes as recipes
    from deepsqueeze.errors import RecipeError

    def multi_line(path):
        raise RecipeError("first line\nsecond line\r\n\tthird")

    monkeypatch.setattr(recipes, "load_recipe", multi_line)
    line = assert_one_line(*run(capsys, "compress", "--model", "zoo:lenet300", "--recipe", "x.yaml",
                                "--out", "x.dsq"))
    assert line == "error: first line second line third"


# ---------------------------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("text", [
    "stages: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "".join(f"{' ' * i}k{i}:\n" for i in range(1_200)),
])
def test_deeply_nested_recipe(capsys, workdir, text):
    (workdir / "deep.yaml").write_text(text)
    assert_one_line(*run(capsys, "compress", "--model", "zoo:lenet300", "--recipe", "deep.yaml",
                         "--out", "x.dsq"), "deep.yaml", "nest")
    assert not (workdir / "x.dsq").exists()


@pytest.mark.parametrize("out_dir", ["/sys/demo-out", "a-file"])
def test_demo_out_dir_that_cannot_be_written(capsys, workdir, out_dir):
    (workdir / "a-file").write_text("not a folder")
    assert_one_line(*run(capsys, "demo", "--quick", "--out-dir", out_dir), out_dir)


def test_model_that_does_not_fit_the_data_is_found_before_any_stage(capsys, workdir, monkeypatch):
    (workdir / "ft.yaml").write_text(FINETUNE)
    assert_one_line(*run(capsys, "compress", "--model", "zoo:lenet300", "--data", "digits", "--recipe", "ft.yaml",
                         "--out", "x.dsq"), "(1, 28, 28)", "(1, 8, 8)")
    write_module(workdir, "ds_bad_forward", """
        from torch import nn

        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)

            def forward(self, x):
                raise RuntimeError("forward is broken\\nline two")

        def make():
            return Bad()
    """)
    monkeypatch.syspath_prepend(str(workdir))
    assert_one_line(*run(capsys, "compress", "--model", "py:ds_bad_forward:make", "--data", "digits",
                         "--recipe", "ft.yaml", "--out", "x.dsq"), "does not run on digits",
                    "RuntimeError: forward is broken line two")
    assert not (workdir / "x.dsq").exists()


@pytest.mark.parametrize("argv", [
    ["export", "m.dsq", "--format", "onnx", "--out", "m.onnx", "--threads", "100000"],
    ["evaluate", "zoo:lenet300@digits", "--data", "digits", "--threads", "0"],
    ["evaluate", "zoo:lenet300@digits", "--data", "digits", "--batch-size", "1000000000"],
    ["bench", "export", "--threads", "-1"],
])
def test_thread_and_batch_counts_are_bounded_before_any_work(capsys, workdir, argv):
    """--threads 100000 on export started 100,000 ONNX Runtime threads (16 GB resident, load 900)."""
    from deepsqueeze.testing.cli import run

    code, _, err = run(capsys, *argv)
    assert code == 2 and "Invalid value" in err and "Traceback" not in err

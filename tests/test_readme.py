"""README.md is tested documentation (issue 24): every shell command and Python block in it runs here.

Where the README names something large, a declared substitution (:data:`SUBSTITUTIONS`) puts a small thing in
its place, as the conformance matrix uses tiny models: MiniLM becomes a tiny sentence-transformers folder,
LeNet-5 trains on the bundled digits instead of Fashion-MNIST. Commands that cannot run inside the suite are
listed in :data:`NOT_RUN` with the test that covers them instead. A command the README gains is run without
anyone adding it here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (README text, what runs instead): applied in order to every shell command and Python block.
SUBSTITUTIONS = [
    ("train zoo:lenet5 --data fashion-mnist", "train zoo:lenet5 --data digits"),
    ("zoo:lenet5@fashion-mnist", "zoo:lenet5@digits"),
    ("lenet5.dsq --data fashion-mnist", "lenet5.dsq --data digits"),
    ("plan --model zoo:lenet5 ", "plan --model zoo:lenet5@digits "),
    ("evaluate minilm --data", "evaluate hf:tiny-minilm --data"),
    ('ds.compress("minilm"', 'ds.compress("hf:tiny-minilm"'),
    ("zoo:smollm2-135m", "gguf:model.gguf"),
    ("smollm2-w4.dsq --data wiki:eval", "smollm2-w4.dsq --data text:my-held-out.txt"),
]
# Command prefixes not run here, each with what tests it instead.
NOT_RUN = {
    "make demo": "tests/cli/test_cli.py runs `demo --quick`",
    "make test": "this suite",
    "deepsqueeze bench": "hours of benchmarks: BENCHMARKS.md holds their output; tests/test_packaging.py runs "
                         "`bench --list` from a wheel",
    "deepsqueeze demo": "minutes; tests/cli/test_cli.py runs `demo --quick`",
}


def _blocks(kind: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"```{kind}\n(.*?)```", text, flags=re.S)]


def _commands() -> list[tuple[int, str]]:
    out = []
    for line_no, block in _blocks("sh"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for offset, line in enumerate(joined.splitlines()):
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                out.append((line_no + offset + 1, command))
    return out


def _substitute(text: str) -> str:
    for old, new in SUBSTITUTIONS:
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding what the README's user has: mynet.py and its weights, an encoder folder, a GGUF file,
    sentence files."""
    from safetensors.torch import save_file

    from deepsqueeze.data import resolve_data
    from deepsqueeze.testing.gguf_models import make_gguf
    from deepsqueeze.testing.hf_models import make_st_dir

    folder = tmp_path_factory.mktemp("readme")
    python = dict(_blocks("python"))
    mynet = next(code for code in python.values() if code.startswith("# mynet.py"))
    (folder / "mynet.py").write_text(mynet, encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        import mynet as user_module

        save_file(user_module.build().state_dict(), str(folder / "mynet.safetensors"))
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mynet", None)
    make_st_dir(folder / "my-encoder", head=("dense:16",))
    make_gguf(folder / "model.gguf")
    make_st_dir(folder / "tiny-minilm", pooling="mean", head=("normalize",))
    sentences = resolve_data("pydoc-sentences:calib").sentences
    (folder / "my-sentences.txt").write_text("\n".join(sentences[:96]) + "\n", encoding="utf-8")
    (folder / "my-held-out.txt").write_text("\n".join(sentences[96:160]) + "\n", encoding="utf-8")
    return folder


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "src")])}


def test_every_readme_command_runs(workdir, monkeypatch):
    from deepsqueeze.testing.conformance import cli

    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))  # `export PYTHONPATH=.`, as the README says
    ran, failed = [], []
    for line_no, command in _commands():
        if any(command.startswith(prefix) for prefix in NOT_RUN) or command.startswith("export "):
            continue
        argv = shlex.split(_substitute(command))
        assert argv[0] == "deepsqueeze", f"README line {line_no}: not a deepsqueeze command: {command}"
        code, _out, err, _seconds = cli(argv[1:])
        ran.append(command)
        if code != 0 or "Traceback" in err:
            failed.append(f"README line {line_no}: {command}\n  exit {code}: {err.strip()[-600:]}")
    assert not failed, "\n".join(failed)
    assert len(ran) >= 15


def test_every_readme_python_block_runs(workdir):
    for line_no, code in _blocks("python"):
        if code.startswith("# mynet.py"):
            continue  # written as mynet.py by the fixture and imported by the commands above
        result = subprocess.run([sys.executable, "-c", _substitute(code)], cwd=workdir, env=_env(workdir),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README line {line_no}:\n{result.stderr[-1500:]}"


def test_the_readme_recipe_is_a_valid_recipe(workdir):
    import yaml

    from deepsqueeze.recipes import parse_recipe

    for _line_no, text in _blocks("yaml"):
        parse_recipe(yaml.safe_load(text))

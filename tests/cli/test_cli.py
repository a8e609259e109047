"""The CLI through its real entry point: exactly one JSON object with --json, one line and exit 2 on user errors."""

import json
import subprocess
import sys

import pytest

from deepsqueeze.testing.cli import run


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_inspect_json_is_one_object(capsys):
    code, out, _ = run(capsys, "inspect", "zoo:lenet300", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["params"] == 266_610 and info["layers"]["Linear"] == 3


def test_compress_then_evaluate_scores_the_same(capsys, workdir):
    (workdir / "ft.yaml").write_text("stages:\n  - type: finetune\n    epochs: 1\n    limit: 256\n")
    code, out, err = run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "ft.yaml",
                         "--out", "ft.dsq", "--json")
    assert code == 0, err
    compressed = json.loads(out)
    assert compressed["artifact_bytes"] == (workdir / "ft.dsq").stat().st_size
    code, out, err = run(capsys, "evaluate", "ft.dsq", "--data", "digits", "--no-latency", "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    assert evaluated["accuracy"] == compressed["accuracy"]
    assert evaluated["artifact_bytes"] == compressed["artifact_bytes"]
    assert evaluated["compression_ratio"] == pytest.approx(compressed["compression_ratio"])


def test_typoed_recipe_key(capsys, workdir):
    (workdir / "bad.yaml").write_text("stages:\n  - type: finetune\n    epoch: 1\n")
    assert_one_line_error(*run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "bad.yaml",
                               "--out", "x.dsq"), "'epoch'", "did you mean 'epochs'")
    assert not (workdir / "x.dsq").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_artifact(capsys, workdir, lenet300_digits, damage):
    from deepsqueeze.artifact import save

    save(lenet300_digits, workdir / "m.dsq")
    blob = bytearray((workdir / "m.dsq").read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[-100] ^= 0x40
    (workdir / "m.dsq").write_bytes(bytes(blob))
    assert_one_line_error(*run(capsys, "evaluate", "m.dsq", "--data", "digits", "--json"), "m.dsq")


def test_missing_dataset(capsys, workdir):
    assert_one_line_error(*run(capsys, "evaluate", "zoo:lenet300", "--data", f"fashion-mnist:{workdir / 'none'}"),
                          "dataset-fashion-mnist")


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "no/such/model.dsq"], "does not exist"),
    (["inspect", "zoo:lenet9000"], "lenet9000"),
    (["train", "minilm", "--data", "digits"], "zoo"),
    (["evaluate", "zoo:lenet300@digits", "--data", "imagenet"], "imagenet"),
    (["compress", "--model", "zoo:lenet300@digits", "--recipe", "missing.yaml", "--out", "o.dsq"], "does not exist"),
])
def test_user_errors_are_one_line(capsys, workdir, argv, needle):
    assert_one_line_error(*run(capsys, *argv), needle)


def test_usage_error_exits_2(capsys):
    code, _, _ = run(capsys, "evaluate")
    assert code == 2


def test_installed_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deepsqueeze", "inspect", str(tmp_path / "nope.dsq")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


def test_quick_demo_compares_fp32_with_the_artifact(capsys, workdir):
    code, out, err = run(capsys, "demo", "--quick", "--out-dir", "demo", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [row["variant"] for row in rows][0] == "fp32" and len(rows) == 2
    assert rows[1]["size_mb"] * 1e6 == pytest.approx(sum(p.stat().st_size for p in (workdir / "demo").glob("*.dsq")))


def test_ort_backend_scores_like_torch(capsys, lenet300_digits):
    pytest.importorskip("onnxruntime")
    results = {}
    for backend in ("torch", "ort"):
        code, out, err = run(capsys, "evaluate", "zoo:lenet300@digits", "--data", "digits", "--backend", backend,
                             "--no-latency", "--json")
        assert code == 0, err
        results[backend] = json.loads(out)
    assert results["ort"]["backend"] == "ort"
    assert results["ort"]["accuracy"] == pytest.approx(results["torch"]["accuracy"], abs=0.003)
    assert results["ort"]["params"] == results["torch"]["params"]


def test_tables_fit_100_columns_and_name_what_they_leave_out(capsys, tmp_path):
    """Issue 29 finding 4: tables ran 200-400 columns with headers cut; the reader's columns come first."""
    import deepsqueeze.cli._common as common

    model = "py:deepsqueeze.testing.models:TinyResNet"
    code, out, err = run(capsys, "plan", "--model", model, "--data", "digits", "--recipe", "w4-rtn")
    assert code == 0, err
    code, out2, err = run(capsys, "compress", "--model", model, "--data", "digits", "--recipe", "prune-agp",
                          "--out", str(tmp_path / "m.dsq"), "--report")
    assert code in (0, 3), err
    for text in (out, out2):
        assert max(len(line) for line in text.splitlines()) <= common.TABLE_WIDTH
    assert "into" in out and "ratio" in out2 and "accuracy" in out2
    wide = common.rows_table("t", [{f"column_{i}": 123456789 for i in range(20)}])
    assert "not shown (--json has them): column_" in str(wide.caption)

"""A new user's first hour (issue 16), through the real entry point: version, help, recipe listing and
lookup from any directory, cached training, per-stage report columns, a clear message when the package
is shadowed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import assert_one_line_error, run

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_version(capsys):
    from deepsqueeze import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"deepsqueeze {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["train", "--help"], ["evaluate", "--help"]])
def test_help_has_plain_metavars(capsys, wide, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    for label in ("<bool>", "<str>", "<path>", "<int>", "<float>"):
        assert label not in out, (label, out)


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"]])
def test_help_lists_recipes_and_stage_types(capsys, wide, argv):
    from deepsqueeze.core.config import registered_stages
    from deepsqueeze.recipes.schema import shipped_recipes

    code, out, _ = run(capsys, *argv)
    assert code == 0
    text = " ".join(out.split())
    for name in [*shipped_recipes(), *registered_stages()]:
        assert name in text, name
    assert "deepsqueeze recipes" in text


def test_recipes_lists_every_shipped_recipe_and_stage_key(capsys):
    from deepsqueeze.core.config import registered_stages
    from deepsqueeze.recipes.schema import shipped_recipes_dir

    code, out, _ = run(capsys, "recipes", "--json")
    assert code == 0
    listing = json.loads(out)
    assert set(listing["recipes"]) == {p.stem for p in shipped_recipes_dir().glob("*.yaml")}
    assert all(listing["recipes"].values()), "every shipped recipe has a one-line description"
    stages = registered_stages()
    assert set(listing["stages"]) == set(stages)
    for stage_type, config_cls in stages.items():
        assert list(listing["stages"][stage_type]) == list(config_cls.model_fields)
    assert listing["stages"]["finetune"]["epochs"] == stages["finetune"]().epochs

    code, out, _ = run(capsys, "recipes")
    lines = out.splitlines()
    for name, description in listing["recipes"].items():
        assert sum(line.split()[:1] == [name] and description in line for line in lines) == 1, name
    assert any(line.strip().startswith("prune_transformer: ") and "heads=" in line for line in lines)


def test_bare_recipe_name_works_from_any_directory(capsys, workdir, lenet300_digits):
    code, out, err = run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "int8-dynamic",
                         "--out", "q.dsq", "--json")
    assert code == 0, err
    assert json.loads(out)["artifact_bytes"] == (workdir / "q.dsq").stat().st_size


@pytest.mark.parametrize("recipe, needles", [
    ("int8-dynamc", ["did you mean 'int8-dynamic'"]),
    ("recipes/finetune.yaml", ["--recipe finetune"]),
])
def test_missing_recipe_suggests_the_shipped_one(capsys, workdir, recipe, needles):
    assert_one_line_error(*run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", recipe,
                               "--out", "o.dsq"), *needles)
    assert not (workdir / "o.dsq").exists()


def test_misspelt_stage_type_gets_a_suggestion(capsys, workdir):
    (workdir / "r.yaml").write_text("stages:\n  - type: quantise\n")
    assert_one_line_error(*run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "r.yaml",
                               "--out", "o.dsq"), "did you mean 'quantize'")


def test_train_of_a_cached_model_returns_at_once(capsys, lenet300_digits, monkeypatch):
    import deepsqueeze.zoo.pretrained as pretrained
    from deepsqueeze.zoo.pretrained import checkpoint_path

    calls = []
    real = pretrained.train_zoo_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **{**kwargs, "epochs": 0.05})

    monkeypatch.setattr(pretrained, "train_zoo_model", counting)
    path = checkpoint_path("lenet300", "digits")
    before = path.read_bytes()
    code, out, err = run(capsys, "train", "zoo:lenet300", "--data", "digits", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert calls == [] and result["cached"] is True and result["checkpoint"] == str(path)
    assert result["accuracy"] > 0.9
    code, out, err = run(capsys, "train", "zoo:lenet300", "--data", "digits")
    assert code == 0 and "cached" in err and "--force" in err
    try:
        code, out, err = run(capsys, "train", "zoo:lenet300", "--data", "digits", "--force", "--json")
        assert code == 0, err
        assert len(calls) == 1 and json.loads(out)["cached"] is False
    finally:
        path.write_bytes(before)  # the session's other tests read the standard checkpoint


def test_report_has_bytes_and_quality_per_stage(capsys, workdir, lenet300_digits):
    (workdir / "r.yaml").write_text("stages:\n  - type: prune\n    sparsity: 0.5\n  - type: quantize\n"
                                    "    method: dynamic\n")
    code, out, err = run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "r.yaml", "--out", "r.dsq",
                         "--report", "--json")
    assert code == 0, err
    result = json.loads(out)
    first, last = result["stages"]
    assert last["bytes"] == result["artifact_bytes"] == (workdir / "r.dsq").stat().st_size
    assert last["accuracy"] == result["accuracy"]
    assert last["ratio"] == pytest.approx(result["compression_ratio"])
    assert first["bytes"] > last["bytes"] and 0.5 < first["accuracy"] <= 1
    code, out, err = run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "r.yaml", "--out", "r2.dsq",
                         "--report")
    header = next(line for line in out.splitlines() if "stage" in line and "bytes" in line)
    assert "accuracy" in header and "ratio" in header


def test_a_folder_named_deepsqueeze_shadowing_the_package_gets_one_line(tmp_path):
    (tmp_path / "deepsqueeze" / "src").mkdir(parents=True)  # a clone: the package is one level further down
    code = ("import sys; import deepsqueeze_cli; "
            f"sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if p and 'site-packages' not in p "
            f"and p != {str(SRC)!r}]; deepsqueeze_cli.main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(tmp_path / "deepsqueeze") in proc.stderr and "PYTHONPATH" in proc.stderr


def test_console_script_runs_through_the_shadowing_check():
    import tomllib

    scripts = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["deepsqueeze"] == "deepsqueeze_cli:main"
    proc = subprocess.run([sys.executable, "-c", "import sys, deepsqueeze_cli; sys.argv=['deepsqueeze','--version'];"
                           " deepsqueeze_cli.main()"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("deepsqueeze "), proc.stderr


def _demo_row(variant, reliable=True, **extra):
    row = {"model": "zoo:lenet5@fashion-mnist", "variant": variant, "size_mb": 1.7245, "ratio": 51.23,
           "accuracy": 0.91234, "latency_ms": 3.14159, "latency_ms_p10": 3.0, "latency_ms_p90": 3.5,
           "latency_batch": 64, "speedup": 32.5, "speedup_p10": 2.0, "speedup_p90": 60.0,
           "latency_reliable": reliable, "latency_note": None if reliable else "machine busy (load average 18.0 "
           "on 2 CPUs)", "compress_s": 923.04, "compress_includes_training": True}
    return {**row, **extra}


def test_demo_table_is_narrow_and_withholds_unreliable_speedups():
    from rich.console import Console

    from deepsqueeze.cli.demo import demo_table

    rows = [_demo_row("fp32", compress_s=None, compress_includes_training=None, speedup=1.0),
            _demo_row("deep-compression-lenet5", budget_within=True, budget="accuracy ..."),
            _demo_row("int8-static", reliable=False, compress_s=0.4, compress_includes_training=False),
            _demo_row("distill-lenet300", budget_within=False, budget="a drop of 7.35 pp accuracy, over the "
                      "budget of 1 pp accuracy")]
    console = Console(width=80, record=True)
    console.print(demo_table(rows))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    assert "\u2026" not in text and "zoo:lenet5@fashion-mnist: accuracy" in text, text  # nothing cut to "…"
    assert "deep-compression-" in text and "lenet300" in text, text  # names wrap after a hyphen
    assert "1.72" in text and "51.2x" in text and "91.23%" in text and "3.14 ±8%" in text
    assert "32.50x" in text and "923 +train" in text and "0.4" in text
    assert "91.23% over" in text and text.count(" over") == 1


def test_demo_withholds_every_untrusted_timing_with_a_note_per_row():
    """Issue 29 finding 3: fp32 LeNet-5 printed as ``1.67 ±6076%`` beside trusted numbers, and one footnote
    for all rows did not say which row each reason belonged to."""
    from rich.console import Console

    from deepsqueeze.cli.demo import demo_notes, demo_table

    rows = [_demo_row("fp32", reliable=False, latency_ms=1.67, latency_ms_p10=0.1, latency_ms_p90=200.0,
                      latency_note="p10-p90 spread 6076% of the median"),
            _demo_row("int8-static", latency_ms=279.97),
            _demo_row("w4-rtn", reliable=False)]
    console = Console(width=80, record=True)
    console.print(demo_table(rows))
    text = console.export_text()
    assert "1.67" not in text and "6076" not in text and "279.97" in text
    assert "n/a [1]" in text and "n/a [2]" in text
    notes = demo_notes(rows)
    assert any(n.startswith("[1] zoo:lenet5@fashion-mnist fp32") and "6076%" in n for n in notes), notes
    assert any(n.startswith("[2] zoo:lenet5@fashion-mnist w4-rtn") and "load average 18.0" in n for n in notes)
    assert any("+train: includes fine-tuning" in n for n in notes)
    assert any("per batch (its size in the title)" in n for n in notes) and "ms per batch of 64" in text


def test_default_demo_covers_every_family_and_full_adds_the_long_recipes():
    from deepsqueeze.cli.demo import DEFAULT_JOBS, FULL_JOBS
    from deepsqueeze.recipes import load_recipe

    def stage_types(jobs):
        return {stage.stage_type for _, _, names, _ in jobs for name in names for stage in load_recipe(name).stages}

    assert {"quantize", "prune", "share", "encode", "lowrank", "distill"} <= stage_types(DEFAULT_JOBS)
    assert stage_types(FULL_JOBS) >= stage_types(DEFAULT_JOBS)
    assert "w4-gptq" in {n for _, _, names, _ in FULL_JOBS for n in names}


def test_py_model_without_input_shape_takes_it_from_data(capsys, workdir):
    """Issue 16, finding 4: structured pruning and ONNX export of a py: CNN with no input_shape attribute."""
    from deepsqueeze.artifact import load

    ref = "py:deepsqueeze.testing.models:DepthwiseSeparableCNN"
    (workdir / "p.yaml").write_text("stages:\n  - type: prune_channels\n    ratio: 0.25\n")
    code, out, err = run(capsys, "compress", "--model", ref, "--data", "digits", "--recipe", "p.yaml",
                         "--out", "p.dsq", "--json")
    assert code == 0, err
    loaded = load(workdir / "p.dsq", model=ref)
    assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 10
    assert loaded.module.pw1[0].out_channels == 24  # 32 channels, a quarter removed
    pytest.importorskip("onnxruntime")
    code, out, err = run(capsys, "evaluate", ref, "--data", "digits", "--backend", "ort", "--no-latency", "--json")
    assert code == 0, err
    assert json.loads(out)["backend"] == "ort"

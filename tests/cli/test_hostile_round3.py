"""Hostile input, round three (issue 25): signals at the worst moment, output paths through symbolic links,
secrets in messages, tampered study folders, parsers of untrusted text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepsqueeze.artifact import save
from deepsqueeze.errors import one_line, redact
from deepsqueeze.testing.cli import foreground_sigint, run
from deepsqueeze.testing.models import tiny_model_handle

TINY = "py:deepsqueeze.testing.models:TinyMLP"


@pytest.fixture
def tiny(tmp_path):
    save(tiny_model_handle(), tmp_path / "tiny.dsq")
    return tmp_path / "tiny.dsq"


def _one_line_exit_2(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


# --- finding 2: every signal leaves nothing half-written -------------------------------------------------------

@pytest.mark.parametrize("delay", [0.0, 0.4, 0.8, 1.2, 1.6, 2.4])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_export_leaves_no_staging(tmp_path, tiny, console_script, sig, delay):
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([*console_script, "export", str(tiny), "--model-code", TINY, "--format", "onnx",
                             "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=foreground_sigint)
    time.sleep(2.0 + delay)  # the import of torch takes about this long; the export follows
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("tiny.dsq", "m.onnx"))
    assert left == [], left
    if proc.returncode == -sig:  # killed while the interpreter shut down: the export had finished
        assert out.is_file() and "exported" in _, err
    else:
        assert proc.returncode in (0, 128 + sig), (proc.returncode, err)
        # a signal after the file was put in place, complete, cannot take it back: the last line says so
        written = proc.returncode == 0 or err.strip().splitlines()[-1].endswith(f"after writing {out} in full")
        assert out.exists() == written, err


# --- finding 3: --out and --force never follow a link, never replace what deepsqueeze did not write -----------

def test_export_force_never_writes_through_a_link(tmp_path, tiny, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "important.onnx"
    victim.write_bytes(b"not yours")
    (tmp_path / "x.onnx").symlink_to(victim)
    code, _, err = run(capsys, "export", str(tiny), "--model-code", TINY, "--format", "onnx",
                       "--out", str(tmp_path / "x.onnx"), "--force")
    _one_line_exit_2(code, err, "symbolic link")
    assert victim.read_bytes() == b"not yours"
    (tmp_path / "dangling.onnx").symlink_to(elsewhere / "new.onnx")
    code, _, err = run(capsys, "export", str(tiny), "--model-code", TINY, "--format", "onnx",
                       "--out", str(tmp_path / "dangling.onnx"))
    _one_line_exit_2(code, err, "symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["important.onnx"]


def test_force_replaces_only_what_deepsqueeze_wrote(tmp_path, tiny, capsys):
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(b"\x08\x07some other onnx")
    code, _, err = run(capsys, "export", str(tiny), "--model-code", TINY, "--format", "onnx", "--out", str(theirs),
                       "--force")
    _one_line_exit_2(code, err, "not one")
    assert theirs.read_bytes() == b"\x08\x07some other onnx"
    ours = tmp_path / "ours.onnx"
    assert run(capsys, "export", str(tiny), "--model-code", TINY, "--format", "onnx", "--out", str(ours))[0] == 0
    assert run(capsys, "export", str(tiny), "--model-code", TINY, "--format", "onnx", "--out", str(ours),
               "--force")[0] == 0


@pytest.mark.parametrize("command", ["compress", "report"])
def test_out_is_never_a_link_nor_a_file_deepsqueeze_did_not_write(tmp_path, tiny, capsys, command):
    suffix = ".dsq" if command == "compress" else ".html"
    victim = tmp_path / f"victim{suffix}"
    victim.write_text("precious")
    link = tmp_path / f"link{suffix}"
    link.symlink_to(victim)
    for out, needle in ((link, "symbolic link"), (victim, "not a")):
        argv = (["compress", "--model", str(tiny), "--model-code", TINY, "--recipe", "int8-dynamic", "--out", str(out)]
                if command == "compress" else ["report", str(tiny), "--out", str(out)])
        code, _, err = run(capsys, *argv)
        _one_line_exit_2(code, err, needle)
        assert victim.read_text() == "precious"


def test_search_out_is_a_study_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    space = tmp_path / "space.yaml"
    space.write_text("model: zoo:lenet300\nstages:\n  - type: quantize\n    method: dynamic\n")
    code, _, err = run(capsys, "search", "--space", str(space), "--out", str(foreign), "--data", "digits")
    _one_line_exit_2(code, err, "did not write")
    (tmp_path / "a-file").write_text("x")  # a folder that cannot be created, even by root
    code, _, err = run(capsys, "search", "--space", str(space), "--out", str(tmp_path / "a-file" / "study"),
                       "--data", "digits")
    _one_line_exit_2(code, err, "study folder")


# --- finding 4: secrets redacted --------------------------------------------------------------------------------

def test_storage_passwords_and_secret_environment_values_are_redacted(monkeypatch, tmp_path, capsys):
    assert redact("postgresql://postgres:hunter2@127.0.0.1:1/db") == "postgresql://postgres:***@127.0.0.1:1/db"
    monkeypatch.setenv("MY_API_TOKEN", "tok-123456")
    assert "tok-123456" not in one_line("failed with header tok-123456")
    space = tmp_path / "space.yaml"
    space.write_text("model: zoo:lenet300\nstages:\n  - type: quantize\n    method: dynamic\n")
    code, out, err = run(capsys, "search", "--space", str(space), "--out", str(tmp_path / "s"), "--data", "digits",
                         "--storage", "postgresql://postgres:hunter2@127.0.0.1:1/nodb")
    assert code == 2 and "hunter2" not in err + out, err


# --- finding 8: report reads, never writes, and refuses a tampered study ----------------------------------------

@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    from deepsqueeze.search import load_space, run_search

    root = tmp_path_factory.mktemp("study")
    space = root / "space.yaml"
    space.write_text("model: zoo:lenet300\nseed: 0\nstages:\n  - type: quantize\n    method: rtn\n"
                     "    bits: {choice: [4, 8]}\n")
    parsed, model = load_space(space, "zoo:lenet300@digits")
    run_search(parsed, model, root / "out", "digits", sampler="grid", trials=2, progress=False)
    return root / "out"


def _copy(study: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(study, dst)
    return dst


@pytest.mark.parametrize("tamper", [
    "not json", "[]", '{"front": [{"bytes": 1}]}', '{"baseline": "fast"}', '{"objectives": ["speed"]}',
    '{"front": [{"trial": true}]}', '{"best": {"trial": "0; DROP TABLE"}}', "[" * 100_000,
    '{"baseline": {"quality": 1' + "0" * 5000 + ', "bytes": 1, "latency_ms": 1}}',
])
def test_report_refuses_a_tampered_summary_in_one_line(tmp_path, study_dir, capsys, tamper):
    folder = _copy(study_dir, tmp_path / "s")
    (folder / "summary.json").write_text(tamper)
    before = (folder / "study.db").read_bytes()
    code, _, err = run(capsys, "report", str(folder), "--out", str(tmp_path / "r.html"))
    _one_line_exit_2(code, err, "summary")
    assert (folder / "study.db").read_bytes() == before and not (tmp_path / "r.html").exists()


def test_report_never_writes_the_study_it_reads(tmp_path, study_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "study.db").write_bytes(b"")
    code, _, err = run(capsys, "report", str(empty), "--out", str(tmp_path / "r.html"))
    _one_line_exit_2(code, err, "no Optuna study")
    assert (empty / "study.db").read_bytes() == b""
    folder = _copy(study_dir, tmp_path / "s")
    os.chmod(folder / "study.db", 0o444)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert run(capsys, "report", str(folder), "--out", str(tmp_path / "ok.html"))[0] == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_report_refuses_tampered_trial_attributes(tmp_path, study_dir, capsys):
    import sqlite3

    folder = _copy(study_dir, tmp_path / "s")
    con = sqlite3.connect(folder / "study.db")
    con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'quality'", (json.dumps("high"),))
    con.commit()
    con.close()
    code, _, err = run(capsys, "report", str(folder), "--out", str(tmp_path / "r.html"))
    _one_line_exit_2(code, err, "quality")


@pytest.mark.parametrize("sql, args", [
    ("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'recipe'", ("not json",)),
    ("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'quality'", ("1" * 5000,)),
    ("UPDATE study_user_attributes SET value_json = ? WHERE key = 'baseline'", ('{"a" 1}',)),
    ("UPDATE study_user_attributes SET value_json = ? WHERE key = 'objectives'", ("[" * 10_000,)),
    ("UPDATE trials SET state = ? WHERE number = 0", ("NOPE",)),
    ("UPDATE trial_params SET distribution_json = ?", ('{"name": "CategoricalDistribution", "attributes": {}}',)),
    ("UPDATE trial_params SET distribution_json = ?",
     ('{"name": "CategoricalDistribution", "attributes": {"choices": []}}',)),
])
def test_report_refuses_rows_optuna_cannot_decode(tmp_path, study_dir, sql, args):
    """Found by the study fuzzer (tests/fuzz/test_study.py): Optuna decodes rows lazily, so these raised
    JSONDecodeError, ValueError, RecursionError, LookupError, KeyError or IndexError from inside Optuna instead of
    one RecipeError; the folder is still never written."""
    import sqlite3

    from deepsqueeze.errors import RecipeError
    from deepsqueeze.report import study_report

    folder = _copy(study_dir, tmp_path / "s")
    con = sqlite3.connect(folder / "study.db")
    con.execute(sql, args)
    con.commit()
    con.close()
    before = (folder / "study.db").read_bytes()
    with pytest.raises(RecipeError):
        study_report(folder)
    assert (folder / "study.db").read_bytes() == before


def test_report_refuses_a_schema_name_that_is_not_utf8(tmp_path, study_dir):
    """Found by the study fuzzer: one damaged byte in a table name raised UnicodeDecodeError from the schema check."""
    from deepsqueeze.errors import RecipeError
    from deepsqueeze.report import study_report

    folder = _copy(study_dir, tmp_path / "s")
    data = bytearray((folder / "study.db").read_bytes())
    data[data.find(b"trial_heartbeats") + 2] = 0x81
    (folder / "study.db").write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="not a readable SQLite study"):
        study_report(folder)


def test_summary_parsers_are_bounded():
    from deepsqueeze.core.jsonfile import loads_bounded

    for text in ("[" * 100_000 + "]" * 100_000, '{"a": 1' + "0" * 5000 + "}", '{"a": NaN}', "[1e999]"):
        with pytest.raises(ValueError):
            loads_bounded(text)
    assert sys.getrecursionlimit() > 0


# --- finding 7: untrusted text parsers end in one line -----------------------------------------------------------

def test_a_path_component_over_255_characters_is_one_line(tmp_path, capsys):
    long = tmp_path / ("x" * 300)
    code, _, err = run(capsys, "inspect", f"hf:{long}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_native_parser_panic_is_one_line(tmp_path, capsys, monkeypatch):
    """pyo3's PanicException derives from BaseException: it passes every ``except Exception``."""
    import deepsqueeze.resolve

    class PanicException(BaseException):
        pass

    def panic(*args, **kwargs):
        raise PanicException("regex size limit exceeded")

    monkeypatch.setattr(deepsqueeze.resolve, "resolve_base_model", panic)
    code, _, err = run(capsys, "inspect", "hf:whatever")
    _one_line_exit_2(code, err, "native parser")


def test_a_forged_base_path_component_over_255_characters_is_an_artifact_error(tmp_path):
    from deepsqueeze.artifact import load
    from deepsqueeze.errors import ArtifactError
    from deepsqueeze.testing.forge import forge_manifest

    save(tiny_model_handle(), tmp_path / "t.dsq")
    forged = forge_manifest(tmp_path / "t.dsq", tmp_path / "f.dsq",
                            lambda m: m.update(base={"kind": "hf", "path": "/" + "y" * 300}))
    with pytest.raises(ArtifactError, match="255"):
        load(forged)


def test_warnings_are_one_line_without_a_source_path(tmp_path):
    """Issue 29 finding 4: a raw DeepsqueezeWarning line with the source file path leaked into the output."""
    code = ("import warnings, sys\nfrom deepsqueeze.cli.app import _show_warning\nwarnings.showwarning = _show_warning\n"
            "from deepsqueeze.errors import DeepsqueezeWarning\n"
            "warnings.warn('a thing\\nover two lines', DeepsqueezeWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip() == "warning: a thing over two lines", proc.stderr

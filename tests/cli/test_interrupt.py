"""Ctrl-C and SIGTERM through the real console script: ``interrupted`` / ``terminated`` on stderr, exit 130 /
143, no partial file, input untouched (issue 25 finding 2: SIGTERM left the temporary behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepsqueeze.testing.cli import foreground_sigint

# The model's forward pass creates STARTED on its first call, so the signal lands while the stage is training.
MODEL_CODE = textwrap.dedent('''
    import os
    from pathlib import Path

    from torch import nn


    class Slow(nn.Module):
        input_shape = (1, 8, 8)
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            Path(os.environ["DS_STARTED"]).touch()
            return self.fc(x.flatten(1))


    def make():
        return Slow()
''')


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_compress_cleans_up_and_leaves_no_file(tmp_path: Path, console_script: list[str],
                                                                sig: int, code: int, word: str) -> None:
    (tmp_path / "ds_interrupt_model.py").write_text(MODEL_CODE)
    (tmp_path / "long.yaml").write_text("stages:\n  - type: finetune\n    epochs: 10000\n")
    files_before = sorted(p.name for p in tmp_path.iterdir())
    started = tmp_path / "started.flag"
    env = {**os.environ, "DS_STARTED": str(started),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(
        [*console_script, "compress", "--model", "py:ds_interrupt_model:make", "--data", "digits",
         "--recipe", "long.yaml", "--out", "out.dsq"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=foreground_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate()
                pytest.fail(f"compress ended (rc {proc.returncode}) before training started: {err}")
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word, err
    assert "Traceback" not in err and out == ""
    started.unlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == files_before


SWALLOWING_CODE = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    from torch import nn


    def make():
        """A factory that calls a library which turns Ctrl-C / SIGTERM into its own error (as torch's C
        initialisation does with the KeyboardInterrupt of an import it runs)."""
        Path(os.environ["DS_STARTED"]).touch()
        try:
            time.sleep(30)
        except KeyboardInterrupt:
            raise RuntimeError("the library failed") from None
        return nn.Linear(64, 10)
''')


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_a_library_swallows_still_ends_the_command(tmp_path: Path, console_script: list[str], sig: int,
                                                            code: int, word: str) -> None:
    """Found by the signal fuzzer (tests/fuzz/test_signals.py): a SIGTERM whose KeyboardInterrupt a library caught
    let the command go on and fail later (exit 2 with a misleading import error, or a traceback)."""
    (tmp_path / "ds_swallow_model.py").write_text(SWALLOWING_CODE)
    started = tmp_path / "started.flag"
    env = {**os.environ, "DS_STARTED": str(started), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(
        [*console_script, "compress", "--model", "py:ds_swallow_model:make", "--data", "digits",
         "--recipe", "int8-dynamic", "--out", "out.dsq"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=foreground_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"compress ended (rc {proc.returncode}) before the factory ran: {proc.communicate()[1]}")
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == word and "Traceback" not in err, err
    assert not (tmp_path / "out.dsq").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_signal_an_import_swallows_while_the_cli_starts_ends_it(tmp_path: Path) -> None:
    """Found by the signal fuzzer: SIGTERM while the CLI imported torch was caught inside torch's C initialisation
    (its NumPy import); the command ran on with NumPy half-imported and failed later with exit 2."""
    driver = textwrap.dedent('''
        import os, signal, sys, time
        import deepsqueeze_cli

        class Swallow:  # a finder that takes the signal's KeyboardInterrupt while the CLI imports
            def find_spec(self, name, path=None, target=None):
                if name == "deepsqueeze.cli.app":
                    sys.meta_path.remove(self)
                    try:
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(5)
                    except KeyboardInterrupt:
                        pass
                return None

        sys.meta_path.insert(0, Swallow())
        sys.argv = ["deepsqueeze", "recipes"]
        deepsqueeze_cli.main()
    ''')
    proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=foreground_sigint)
    assert proc.returncode == 143 and proc.stderr.strip().splitlines()[-1] == "terminated", proc.stderr
    assert proc.stdout == ""



@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_command_ends_with_its_code_not_through_interpreter_exit(monkeypatch, capsys, code):
    """Found by the signal fuzzer: about one SIGINT in seven, 5.5 s into ``python -m deepsqueeze export --format hf``,
    ended as killed by SIGINT (rc -2) although the CLI had caught it, cleaned up and printed ``interrupted``: the
    interpreter's own exit re-raised the signal. The console script now ends an interrupted command with
    ``os._exit(code)`` once its cleanup is done and its streams are flushed (130 / 143 every time since)."""
    import deepsqueeze.cli.app as app
    import deepsqueeze_cli

    exits: list[int] = []

    def fake_exit(status: int) -> None:
        exits.append(status)
        raise SystemExit(status)

    def interrupted_command(argv=None) -> None:
        print("terminated" if code == 143 else "interrupted", file=sys.stderr)
        sys.exit(code)

    monkeypatch.setattr(app, "main", interrupted_command)
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["deepsqueeze", "recipes"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit):
            deepsqueeze_cli.main()
    finally:
        for s, handler in handlers.items():  # main() installs the console script's handlers: not for pytest
            signal.signal(s, handler)
    assert exits == [code]
    assert capsys.readouterr().err.strip() == ("terminated" if code == 143 else "interrupted")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_after_the_output_is_in_place_says_it_was_written(tmp_path, monkeypatch, capsys, sig, code, word):
    """Found by CI: SIGTERM 3.6 s into ``export --format onnx`` exited 143 with ``m.onnx`` complete beside a bare
    ``terminated``, so a user read it as not written. A signal that lands after a file is put in place is held
    until it is recorded, and the last line names it."""
    import deepsqueeze.cli.app as app
    from deepsqueeze.core import files

    out = tmp_path / "m.json"
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), sig)  # the signal lands the moment the file is in place

    monkeypatch.setattr(os, "replace", replace_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(app.typer.main, "get_command", lambda _: _Writes(lambda: files.write_text_atomic(out, "{}")))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a console starts it (an earlier test may not)
    try:
        with pytest.raises(SystemExit) as exc:
            app.main(["anything"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert exc.value.code == code and out.read_text() == "{}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{word} after writing {out} in full"


class _Writes:
    """A stand-in for the CLI's click command that only runs ``action``."""

    def __init__(self, action):
        self.action = action

    def make_context(self, name, args):
        import contextlib

        return contextlib.nullcontext()

    def invoke(self, ctx):
        self.action()


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_staging_is_removed_still_removes_all_of_it(tmp_path, monkeypatch, sig, fails):
    """Found by CI: SIGINT 2.4 s into ``export --format onnx`` left the staging folder ``.m.onnx.ltq7lxvj`` beside
    ``m.onnx``: the signal landed while the folder was being removed and cut the removal short. Every removal of a
    temporary (``core.files.discard``) now holds signals back until it is done, whether the export succeeded or
    failed."""
    import shutil
    from types import SimpleNamespace

    from deepsqueeze.core import signals
    from deepsqueeze.export.check import ExportResult, write_verified

    real_rmtree = shutil.rmtree

    def signal_then_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), sig)  # the signal lands as the removal starts
        real_rmtree(path, *args, **kwargs)

    def write(staged: Path, sample) -> ExportResult:
        staged.write_bytes(b"model")
        (staged.parent / "weights.data").write_bytes(b"sidecar")  # what a rename of ``staged`` leaves behind
        if fails:
            raise RuntimeError("the runtime refused the file")
        return ExportResult(str(staged), "onnx", 5)

    out = tmp_path / "m.onnx"
    monkeypatch.setattr(shutil, "rmtree", signal_then_rmtree)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            write_verified(SimpleNamespace(artifact_path=None, ref="x"), "onnx", out, write, sample={})
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if fails else ["m.onnx"])

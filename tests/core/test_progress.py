"""Progress outside a terminal: plain lines on stderr naming the stage, its position and the step (issue 16)."""

import os
import subprocess
import sys
from pathlib import Path

from deepsqueeze.core.progress import stage, track

SRC = Path(__file__).resolve().parents[2] / "src"


def test_compress_with_pipes_logs_every_stage_and_epoch(tmp_path, lenet300_digits):
    (tmp_path / "r.yaml").write_text("stages:\n  - type: prune\n    sparsity: 0.5\n"
                                     "  - type: finetune\n    epochs: 2\n    limit: 128\n"
                                     "  - type: share\n    bits: 4\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent)])}
    proc = subprocess.run([sys.executable, "-m", "deepsqueeze", "compress", "--model", "zoo:lenet300@digits",
                           "--recipe", "r.yaml", "--out", "o.dsq"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[deepsqueeze] ")]
    for needle in ("stage 1/3 prune: started", "stage 2/3 finetune: training on digits, epoch 1/2",
                   "stage 2/3 finetune: training on digits, epoch 2/2", "stage 3/3 share: k-means weight sharing",
                   "stage 3/3 share: done in"):
        assert any(needle in line for line in lines), (needle, proc.stderr)
    final = [line for line in lines if "epoch 2/2" in line][-1]
    assert "2/2 steps (100%)" in final and "loss " in final
    assert "\x1b[" not in proc.stderr  # no terminal control codes in a log
    assert "[deepsqueeze]" not in proc.stdout


def test_json_output_keeps_stderr_quiet(workdir, lenet300_digits, capsys):
    from tests.cli.test_cli import run

    code, out, err = run(capsys, "compress", "--model", "zoo:lenet300@digits", "--recipe", "int8-dynamic",
                         "--out", "o.dsq", "--json")
    assert code == 0 and "[deepsqueeze]" not in err


def test_log_lines_once_per_label_and_at_the_end(capsys, monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_PROGRESS_INTERVAL", "3600")
    monkeypatch.setattr("deepsqueeze.core.progress.RENAMED_GAP_S", 0.0)
    with stage(1, 4, "prune"), track("epoch 1/2", 100) as bar:
        for i in range(100):
            if i == 50:
                bar.set("epoch 2/2")
            bar.advance(detail=f"loss {i}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[deepsqueeze] stage 2/4 prune: started"
    assert lines[1].startswith("[deepsqueeze] stage 2/4 prune: epoch 1/2  1/100 steps (1%)  loss 0")
    assert lines[2].startswith("[deepsqueeze] stage 2/4 prune: epoch 2/2  51/100 steps (51%)  loss 50")
    assert lines[3].startswith("[deepsqueeze] stage 2/4 prune: epoch 2/2  100/100 steps (100%)  loss 99")
    assert lines[4].startswith("[deepsqueeze] stage 2/4 prune: done in") and len(lines) == 5


def test_parts_renamed_in_quick_succession_get_one_line_per_gap(capsys, monkeypatch):
    """Issue 29: 37 epochs of the bundled digits take 2 s: off a terminal they were 37 lines, one per epoch."""
    monkeypatch.setenv("DEEPSQUEEZE_PROGRESS_INTERVAL", "3600")
    with stage(0, 1, "finetune"), track("epoch 1/40", 40) as bar:
        for i in range(40):
            bar.set(f"epoch {i + 1}/40")
            bar.advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if "epoch" in line]
    assert len(lines) == 2 and "epoch 1/40  1/40" in lines[0] and "epoch 40/40  40/40" in lines[1], lines


def test_disabled_stage_silences_everything_inside(capsys):
    with stage(0, 1, "quantize", enabled=False), track("calibrating", 3) as bar:
        for _ in range(3):
            bar.advance()
    assert capsys.readouterr().err == ""


def test_a_long_unit_is_not_silent_off_a_terminal(capsys, monkeypatch):
    """Issue 29: off a terminal a line comes at least every interval, also while one unit of work runs."""
    import time as _time

    monkeypatch.setenv("DEEPSQUEEZE_PROGRESS_INTERVAL", "0.2")
    with stage(0, 1, "quantize"), track("calibrating", 2, "layers") as bar:
        bar.advance()
        _time.sleep(1.3)  # one long unit: the heartbeat speaks for it
        bar.advance()
    lines = [line for line in capsys.readouterr().err.splitlines() if "calibrating" in line]
    assert len(lines) >= 4, lines
    assert all(line.startswith("[deepsqueeze] stage 1/1 quantize: calibrating") for line in lines)


def test_work_between_steps_is_not_silent_either(monkeypatch):
    """Issue 29: the demo stayed silent 20 s (30 s at load 4) between steps, where no tracker runs (loading a
    model, writing an artifact, a tracker's last line followed by more work): keep_talking fills every gap."""
    import time as _time

    from deepsqueeze.core import progress

    written: list[tuple[float, str]] = []

    class Stream:
        def write(self, text: str) -> None:
            if text.strip():
                written.append((_time.perf_counter(), text.strip()))

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(progress, "_stream", lambda: Stream())
    monkeypatch.setenv("DEEPSQUEEZE_PROGRESS_INTERVAL", "0.5")
    start = _time.perf_counter()
    with progress.keep_talking("demo"):
        with track("evaluating", 1) as bar:
            bar.advance()
        _time.sleep(1.6)  # no tracker here
    times = [start] + [t for t, _ in written]
    assert any("demo: still working" in text and "after: evaluating" in text for _, text in written), written
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 1.0, written  # never a whole interval and more


def test_keep_talking_is_quiet_when_progress_is_off(capsys):
    import time as _time

    from deepsqueeze.core import progress

    with progress.keep_talking("demo", enabled=False):
        _time.sleep(0.1)
    assert capsys.readouterr().err == ""

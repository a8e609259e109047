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

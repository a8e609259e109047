"""Signals at random moments: ``deepsqueeze compress`` and ``export`` (ONNX, and a Hugging Face folder through a
staging folder) run as the console script does, and get SIGINT or SIGTERM after a random delay (while Python
and torch import, while the stage runs, while the output is written, or after the command is done).

What must hold for every run (issue 25, finding 2, as a campaign): the exit code is 0, 130 (SIGINT) or 143
(SIGTERM), with ``interrupted`` / ``terminated`` as the last line of stderr and no traceback; or the process was
killed by the signal during interpreter shutdown, and then only after its output was completely written. No
temporary (``.NAME.*.tmp``), probe or staging folder (``.NAME.*``) is left behind, an output that exists is
complete (a .dsq whose digest verifies, an ONNX model that loads and checks, a folder whose safetensors load),
the input is untouched, and the process exits within ``HANG_S`` of the signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.oracle import HANG_S, Campaign, Canary, Hang, case_rng

SURFACE = "signals"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_SIGNAL_CASES", "2"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))
MODEL = "py:deepsqueeze.testing.models:PlainMLP"
FINETUNE = "stages:\n  - type: prune\n    sparsity: 0.5\n  - type: finetune\n    epochs: 2\n"
PRUNE = "stages:\n  - type: prune\n    sparsity: 0.5\n    storage: dense\n"  # float layers: --format hf takes them


class Violation(Exception):
    """A run broke the signal contract (counted as ``other`` by the oracle)."""


def _foreground_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's foreground process has it


def _env(tmp: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join([src, *(p for p in sys.path if p)])
    return {**os.environ, "PYTHONPATH": path, "DEEPSQUEEZE_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "deepsqueeze", *argv]


def _commands(tmp: Path, with_hf: bool) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (argv, output name, input files to link into the case folder)."""
    cmds = {
        "compress-int8": (_cli("compress", "--model", MODEL, "--data", "digits", "--recipe", "int8-dynamic",
                               "--out", "out.dsq"), "out.dsq", []),
        "compress-finetune": (_cli("compress", "--model", MODEL, "--data", "digits", "--recipe", "finetune.yaml",
                                   "--out", "out.dsq"), "out.dsq", ["finetune.yaml"]),
        "export-onnx": (_cli("export", "base.dsq", "--format", "onnx", "--out", "out.onnx", "--model-code", MODEL),
                        "out.onnx", ["base.dsq"]),
    }
    if with_hf:
        cmds["export-hf"] = (_cli("export", "bert.dsq", "--format", "hf", "--out", "outhf"), "outhf", ["bert.dsq"])
    return cmds


#: Rough wall time of each command here (2 shared cores, niced): the random delays cover 0 to 1.1x of it, so a
#: signal lands while Python imports, while the command works, while it writes, or after it is done.
NOMINAL_WALL_S = {"compress-int8": 7.0, "compress-finetune": 10.0, "export-onnx": 6.0, "export-hf": 12.0}


def _setup(tmp: Path, names: set[str]) -> dict[str, tuple[list[str], str, list[str], float]]:
    """The inputs the chosen commands need (a .dsq of the MLP; of a tiny BERT for the hf export)."""
    inputs = tmp / "inputs"
    inputs.mkdir(parents=True)
    (inputs / "finetune.yaml").write_text(FINETUNE)
    (inputs / "prune.yaml").write_text(PRUNE)
    env = _env(tmp)
    setup = []
    if "export-onnx" in names:
        setup.append(_cli("compress", "--model", MODEL, "--data", "digits", "--recipe", "int8-dynamic",
                          "--out", "base.dsq"))
    if "export-hf" in names:
        from deepsqueeze.testing.hf_models import make_hf_dir

        make_hf_dir("bert", inputs / "bert-dir")
        setup.append(_cli("compress", "--model", f"hf:{inputs / 'bert-dir'}", "--recipe", "prune.yaml",
                          "--out", "bert.dsq"))
    for argv in setup:
        proc = subprocess.run(argv, cwd=inputs, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"setup {argv[3:5]} failed: {proc.stderr[-2000:]}")
    return {name: (*spec, NOMINAL_WALL_S[name]) for name, spec in _commands(tmp, "export-hf" in names).items()
            if name in names}


def _plan(cases: int, start: int, seed: int) -> list[str]:
    """The command of each case: every command in turn first (each at least once in a campaign of 6 or more);
    a run of fewer cases (make test) uses the cheapest command, once per signal."""
    names = sorted(NOMINAL_WALL_S)
    if cases < 6:
        return ["compress-int8"] * cases
    return [names[case % len(names)] if case < len(names) else case_rng(SURFACE, seed, case).choice(names)
            for case in range(start, start + cases)]


def _link_inputs(inputs: Path, work: Path, needs: list[str]) -> None:
    work.mkdir(parents=True)
    for name in needs:
        os.link(inputs / name, work / name)


def _check_complete(path: Path) -> None:
    """``path`` is a whole output: a .dsq whose digest verifies, an ONNX model that loads and passes the checker,
    a Hugging Face folder whose config parses and whose safetensors load."""
    if path.suffix == ".dsq":
        from deepsqueeze.codec.format import read_container

        read_container(path)
    elif path.suffix == ".onnx":
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))
    else:
        from safetensors.torch import load_file

        json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise Violation(f"{path.name} has no safetensors")
        for file in files:
            load_file(str(file))


def _run_case(rng: Any, sig: int, name: str, argv: list[str], out: str, needs: list[str], wall: float,
              inputs: Path, work: Path, env: dict[str, str]) -> None:
    _link_inputs(inputs, work, needs)
    before = {n: (work / n).read_bytes() for n in needs}
    pick = rng.random()  # during imports, anywhere, or near the end (writing the output)
    delay = rng.uniform(0, 1.0) if pick < 0.25 else rng.uniform(0.7 * wall, 1.1 * wall) if pick < 0.5 else \
        rng.uniform(0, 1.1 * wall)
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_foreground_sigint)
    try:
        time.sleep(delay)
        signalled = proc.poll() is None
        if signalled:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=HANG_S if signalled else 600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise Hang() from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code = proc.returncode
    where = f"{name}, {signal.Signals(sig).name} after {delay:.2f} s (rc {code})"
    if "Traceback" in err:
        raise Violation(f"{where}: traceback: {err[-600:]}")
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    output = work / out
    if code == 0:
        _check_complete(output)
    elif code == expected:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        word = "interrupted" if code == 130 else "terminated"
        if last != word and not (output.exists() and last.startswith(f"{word} after writing ")):
            raise Violation(f"{where}: last stderr line {last[:120]!r}")
    elif code == -sig:  # killed by the signal itself, during interpreter shutdown: only once the work was done
        if not output.exists():
            raise Violation(f"{where}: killed by the signal before its output was written")
    else:
        raise Violation(f"{where}: exit code {code}: {err[-400:]}")
    if output.exists():
        try:
            _check_complete(output)
        except Violation:
            raise
        except Exception as exc:  # noqa: BLE001 - a half-written output is the finding
            raise Violation(f"{where}: {out} is incomplete ({type(exc).__name__}: {str(exc)[:160]})") from None
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".probe")))
    if leftovers:
        raise Violation(f"{where}: left {leftovers[:4]}")
    for n, data in before.items():
        if (work / n).read_bytes() != data:
            raise Violation(f"{where}: the input {n} changed")


def run_campaign(cases: int, seed: int, tmp: Path, start: int = 0, progress: Any = None) -> dict[str, Any]:
    tmp = Path(tmp)
    canary = Canary(tmp / "canary")
    plan = _plan(cases, start, seed)
    commands = _setup(tmp, set(plan))
    env = _env(tmp)
    campaign = Campaign(SURFACE, canary, allowed=(), hang_s=900, headroom_mb=None, arm=False)
    campaign.warmed()
    for case, name in zip(range(start, start + cases), plan, strict=True):
        if progress:
            progress(case)
        rng = case_rng(SURFACE, seed, case)
        argv, out, needs, wall = commands[name]
        sig = rng.choice([signal.SIGINT, signal.SIGTERM]) if cases >= 6 else (signal.SIGINT, signal.SIGTERM)[case % 2]
        work = tmp / "cases" / f"c{case}"
        campaign.case(case, name, lambda: _run_case(rng, sig, name, argv, out, needs, wall, tmp / "inputs", work,  # noqa: B023
                                                    env))  # noqa: B023 - called at once
        shutil.rmtree(work, ignore_errors=True)
        if campaign.stop:
            break
    return campaign.result()


@pytest.mark.filterwarnings("ignore")
def test_signals_at_random_moments_leave_nothing_behind(tmp_path):
    pytest.importorskip("onnx")
    result = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert result["failures"] == [], result["failures"][:5]
    assert result["ok"] == result["cases"]

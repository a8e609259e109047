"""Two ``deepsqueeze search`` workers share one study through a real PostgreSQL server.

The test starts its own cluster (Debian's postgresql: initdb + pg_ctl) in a temporary folder, listening on
127.0.0.1 only, as the ``postgres`` user when run as root (the server refuses to run as root).
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml

from tests.search.test_study import SPACE


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl or (os.geteuid() == 0 and shutil.which("runuser") is None):
        if os.environ.get("DEEPSQUEEZE_REQUIRE_DATA") == "1":
            pytest.fail("PostgreSQL is missing but DEEPSQUEEZE_REQUIRE_DATA=1 (CI): apt-get install postgresql")
        pytest.skip("PostgreSQL (Debian package postgresql) is not installed")
    root = Path(tempfile.mkdtemp(prefix="deepsqueeze-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
    subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                                    "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url, lenet300_digits):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    trials = 6
    workers = [subprocess.Popen([sys.executable, "-m", "deepsqueeze", "search", "--space", str(space),
                                 "--out", str(tmp_path / f"worker{i}"), "--storage", postgres_url,
                                 "--study", "shared", "--trials", str(trials), "--sampler", "random", "--json"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=postgres_url.replace("postgresql://",
                                                                                 "postgresql+psycopg://"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # MaxTrialsCallback stops each worker once the shared study holds enough: at most one extra per worker
    assert trials <= len(complete) <= trials + 1
    pids = {str(w.pid) for w in workers}
    assert {t.user_attrs["worker"].rsplit(":", 1)[1] for t in complete} == pids  # both workers ran trials
    # each worker's answer covers the whole study as it stood when that worker stopped, not only its own trials
    answers = [json.loads(out) for out, _ in outputs]
    assert max(a["complete"] for a in answers) == len(complete)
    for answer in answers:
        assert answer["complete"] >= trials
        assert {r["trial"] for r in answer["front"]} <= {t.number for t in complete}

"""Two ``deepsqueeze search`` workers share one study through a real PostgreSQL server.

The test starts its own cluster (Debian's postgresql: initdb + pg_ctl) in a temporary folder, listening on
127.0.0.1 only, as the ``postgres`` user when run as root (the server refuses to run as root).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.search.test_study import SPACE


@pytest.fixture(scope="module")
def postgres_url():
    from deepsqueeze.testing.postgres import postgres_available, temporary_cluster

    if not postgres_available():
        if os.environ.get("DEEPSQUEEZE_REQUIRE_DATA") == "1":
            pytest.fail("PostgreSQL is missing but DEEPSQUEEZE_REQUIRE_DATA=1 (CI): apt-get install postgresql")
        pytest.skip("PostgreSQL (Debian package postgresql) is not installed")
    with temporary_cluster() as url:
        yield url


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

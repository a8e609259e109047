"""Fuzzing study folders: what ``deepsqueeze report`` reads from a ``deepsqueeze search --out`` folder, edited.

The seed is a real study (``run_search`` on a small MLP over digits, three objectives, a compare recipe). Each
case copies its ``summary.json`` and ``study.db`` and edits:

* ``summary``: summary.json as data (front rows, best, baseline, objectives, message; amplified lists) or as text;
* ``study_attrs``: the study's user attributes in ``study.db`` (objectives, baseline, references, model,
  constraints, space), as JSON values or as text that is not JSON;
* ``trial_attrs``: trials' user attributes (quality, bytes, latency_ms, recipe, artifact, ...), rows added,
  deleted or duplicated;
* ``tables``: trial states, parameters and their distributions (what fANOVA reads), objective values and
  directions, the study's name, many copies of a trial;
* ``db``: raw damage to the SQLite file;
* ``references``: planted code references, artifact and recipe paths into the canary folder.

The oracle: ``study_report(folder)`` returns the page or raises ``RecipeError`` (a documented error), within
the time and memory bounds, and ``study.db`` (and the folder) are byte for byte unchanged: report reads only.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz.oracle import (
    Campaign,
    Canary,
    ForwardFailure,
    case_rng,
    mutate_json,
    mutate_text,
    nested,
    random_value,
)

SURFACE = "study"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_STUDY_CASES", "15"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))
KINDS = ["summary", "study_attrs", "trial_attrs", "tables", "db", "references"]
WEIGHTS = [25, 22, 20, 15, 8, 10]
MODEL = "py:deepsqueeze.testing.models:PlainMLP"
SPACE = """seed: 0
objectives: [quality, bytes, latency]
latency: {batch: 8, threads: 1}
compare: [w4-rtn]
stages:
  - type: prune
    optional: true
    sparsity: {choice: [0.5, 0.8]}
  - type: quantize
    method: rtn
    bits: {choice: [4, 8]}
"""
NOT_JSON = ["not json", "", "NaN", "Infinity", "[" * 10_000, "1" * 5000, '{"a": 1', "\x00", '"' + "x" * 100_000 + '"']


def make_seed(tmp: Path) -> Path:
    """A real study folder (four random trials of a small MLP on digits, w4-rtn as a compare reference)."""
    from deepsqueeze.search import load_space, run_search

    (tmp / "space.yaml").write_text(SPACE)
    space, model = load_space(tmp / "space.yaml", MODEL)
    run_search(space, model, tmp / "seed", "digits", sampler="random", trials=4, progress=False)
    return tmp / "seed"


def _edit_attrs(rng: random.Random, con: sqlite3.Connection, table: str, strings: list[str]) -> None:
    pk = table[:-1] + "_id"  # study_user_attributes.study_user_attribute_id (fixed names, no user input)
    rows = list(con.execute(f"SELECT {pk}, key, value_json FROM {table}"))  # noqa: S608
    row_id, key, value_json = rng.choice(rows)
    op = rng.randrange(6)
    if op == 0:
        new = rng.choice(NOT_JSON)
    elif op == 1:
        con.execute(f"DELETE FROM {table} WHERE {pk} = ?", (row_id,))  # noqa: S608
        return
    elif op == 2:
        new = json.dumps(random_value(rng, strings))
    elif op == 3:  # a key added (or replaced) that the reader may or may not expect
        owner = "study_id" if table.startswith("study") else "trial_id"
        (owner_id,) = con.execute(f"SELECT {owner} FROM {table} WHERE {pk} = ?", (row_id,)).fetchone()  # noqa: S608
        con.execute(f"INSERT OR REPLACE INTO {table} ({owner}, key, value_json) VALUES (?, ?, ?)",  # noqa: S608
                    (owner_id, rng.choice(["constraints", "references", "baseline", "quality", "error", "repeat_of",
                                           "latency_ms", "speedup", "x" * 300, ""]),
                     json.dumps(random_value(rng, strings))))
        return
    else:
        try:
            value = json.loads(value_json)
        except ValueError:
            value = None
        new = json.dumps(mutate_json(rng, value, strings) if isinstance(value, (dict, list)) else
                         rng.choice([random_value(rng, strings), nested(rng), [value] * 1000, str(value)]))
    con.execute(f"UPDATE {table} SET value_json = ? WHERE {pk} = ?", (new, row_id))  # noqa: S608


def _edit_tables(rng: random.Random, con: sqlite3.Connection) -> None:
    op = rng.randrange(7)
    if op == 0:
        con.execute("UPDATE trials SET state = ? WHERE trial_id = ?",
                    (rng.choice(["RUNNING", "FAIL", "PRUNED", "WAITING", "NOPE", "", None]), rng.randint(1, 5)))
    elif op == 1:
        con.execute("UPDATE trial_params SET param_value = ? WHERE param_id = ?",
                    (rng.choice([1e308, -1.0, 99.0, float("nan"), None, "x", 2**62]), rng.randint(1, 12)))
    elif op == 2:
        con.execute("UPDATE trial_params SET distribution_json = ? WHERE param_id = ?", (rng.choice([
            "{}", "not json", json.dumps({"name": "CategoricalDistribution", "attributes": {"choices": []}}),
            json.dumps({"name": "FloatDistribution", "attributes": {"low": 1.0, "high": 0.0, "log": False,
                                                                    "step": None}}),
            json.dumps({"name": "IntDistribution", "attributes": {"low": 0, "high": 10**30, "log": True, "step": 1}}),
            json.dumps({"name": "NopeDistribution", "attributes": {}}), json.dumps(nested(rng, 100))]),
            rng.randint(1, 12)))
    elif op == 3:
        con.execute("UPDATE trial_values SET value = ?, value_type = ? WHERE trial_value_id = ?",
                    (rng.choice([None, float("inf"), -1e308, 0.0]), rng.choice(["FINITE", "INF_POS", "NOPE", None]),
                     rng.randint(1, 12)))
    elif op == 4:
        con.execute("UPDATE study_directions SET direction = ? WHERE objective = ?",
                    (rng.choice(["NOT_SET", "MAXIMIZE", "sideways", None]), rng.randint(0, 2)))
    elif op == 5:
        con.execute("UPDATE studies SET study_name = ?", (rng.choice(["other", "", "search "]),))
    else:  # many copies of a trial's attributes on new trials
        for number in range(100, 100 + rng.choice([10, 300])):
            cur = con.execute("INSERT INTO trials (number, study_id, state) VALUES (?, 1, 'COMPLETE')", (number,))
            con.execute("INSERT INTO trial_user_attributes (trial_id, key, value_json) SELECT ?, key, value_json "
                        "FROM trial_user_attributes WHERE trial_id = 1", (cur.lastrowid,))


def _plant_references(rng: random.Random, con: sqlite3.Connection, summary: Any, canary: Canary) -> Any:
    ref = rng.choice(canary.references())
    op = rng.randrange(4)
    if op == 0:
        con.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'model'", (json.dumps(ref),))
    elif op == 1:
        con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key IN ('artifact', 'recipe')",
                    (json.dumps(ref),))
    elif op == 2 and isinstance(summary, dict):
        for row in summary.get("front", []):
            row.update(artifact=ref, recipe_file=str(canary.secret / "other.dsq"))
    else:
        con.execute("UPDATE study_user_attributes SET value_json = ? WHERE key = 'space'",
                    (json.dumps({"model": ref, "stages": [{"type": "prune"}]}),))
    return summary


def mutate(rng: random.Random, seed: Path, case_dir: Path, canary: Canary) -> str:
    """Copy the seed's summary.json and study.db to ``case_dir`` and edit them; return the kind."""
    kind = rng.choices(KINDS, WEIGHTS)[0]
    case_dir.mkdir(parents=True)
    for name in ("summary.json", "study.db"):
        shutil.copyfile(seed / name, case_dir / name)
    summary_text = (seed / "summary.json").read_bytes()
    summary: Any = json.loads(summary_text)
    strings = ["quality", "bytes", "latency", "latency_ms", "trial", "front", "best", "baseline"]
    if kind == "summary":
        if rng.random() < 0.2:
            (case_dir / "summary.json").write_bytes(mutate_text(rng, summary_text))
            return kind
        if rng.random() < 0.15:
            summary["front"] = summary.get("front", [{}])[:1] * rng.choice([2, 1000, 100_000])
        else:
            summary = mutate_json(rng, summary, strings)
    elif kind == "db":
        data = bytearray((case_dir / "study.db").read_bytes())
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        (case_dir / "study.db").write_bytes(bytes(data))
        return kind
    else:
        con = sqlite3.connect(case_dir / "study.db")
        try:
            if kind == "study_attrs":
                _edit_attrs(rng, con, "study_user_attributes", strings)
            elif kind == "trial_attrs":
                _edit_attrs(rng, con, "trial_user_attributes", strings)
            elif kind == "tables":
                _edit_tables(rng, con)
            else:
                summary = _plant_references(rng, con, summary, canary)
            con.commit()
        except sqlite3.IntegrityError:
            con.rollback()  # the schema refuses this edit (NOT NULL, UNIQUE): the case runs on the seed's table
        finally:
            con.close()
    (case_dir / "summary.json").write_text(json.dumps(summary))
    return kind


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def check_report(folder: Path) -> None:
    """The report of ``folder`` renders (or raises a documented error), and the folder is left as it was."""
    from deepsqueeze.report import study_report

    before = _digest(folder)
    try:
        html = study_report(folder)
        if not isinstance(html, str) or "<html" not in html[:2000].lower():
            raise ForwardFailure("study_report returned no page")
    finally:
        after = _digest(folder)
        if after != before:
            changed = sorted(set(after) ^ set(before) | {k for k in before if after.get(k) != before[k]})
            raise ForwardFailure(f"report changed the study folder: {changed}")  # noqa: B012 - the finding


def run_campaign(cases: int, seed: int, tmp: Path, start: int = 0, progress: Any = None) -> dict[str, Any]:
    import optuna

    tmp = Path(tmp)
    os.environ.setdefault("DEEPSQUEEZE_CACHE", str(tmp / "cache"))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    canary = Canary(tmp / "canary")
    seed_dir = make_seed(tmp)
    warm = tmp / "warm"
    warm.mkdir()
    for name in ("summary.json", "study.db"):
        shutil.copyfile(seed_dir / name, warm / name)
    check_report(warm)  # warm-up: plotly, optuna's fANOVA, the page template
    campaign = Campaign(SURFACE, canary)
    campaign.warmed()
    for case in range(start, start + cases):
        if progress:
            progress(case)
        rng = case_rng(SURFACE, seed, case)
        case_dir = tmp / "cases" / f"c{case}"
        kind = mutate(rng, seed_dir, case_dir, canary)
        campaign.case(case, kind, lambda: check_report(case_dir))  # noqa: B023 - called at once
        shutil.rmtree(case_dir, ignore_errors=True)
        if campaign.stop:
            break
    return campaign.result()


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_study_folders_fail_cleanly(tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("plotly")
    result = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert result["failures"] == [], result["failures"][:5]
    assert result["documented_errors"] + result["ok"] == result["cases"]

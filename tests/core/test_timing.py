"""Kernel choice that survives a busy machine (issue 12, finding 4): a margin for the preferred kernel
and decisions stored per CPU, reused by later processes instead of re-racing under load."""

from __future__ import annotations

import json

import pytest

from deepsqueeze.core import timing


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(tmp_path))
    timing.forget_decisions()
    yield tmp_path / "kernels.json"
    timing.forget_decisions()


def _never():
    raise AssertionError("a stored decision must not be re-measured")


def test_preferred_kernel_kept_unless_beaten_by_the_margin(cache, monkeypatch):
    monkeypatch.setattr(timing, "race", lambda fns: {"safe": 1.0, "fast": 0.9})
    assert timing.choose("op a", {"safe": _never, "fast": _never}) == "safe"  # 10% is within the noise margin
    monkeypatch.setattr(timing, "race", lambda fns: {"safe": 1.0, "fast": 0.5})
    assert timing.choose("op b", {"safe": _never, "fast": _never}) == "fast"


def test_decision_is_stored_per_cpu_and_reused_without_racing(cache, monkeypatch):
    monkeypatch.setattr(timing, "race", lambda fns: {"safe": 1.0, "fast": 0.05})
    assert timing.choose("op", {"safe": _never, "fast": _never}) == "fast"
    stored = json.loads(cache.read_text())
    assert stored == {timing.cpu_fingerprint(): {"op among safe,fast": "fast"}}
    timing.forget_decisions()  # a new process: the noisy moment now cannot change the decision
    monkeypatch.setattr(timing, "race", lambda fns: _never())
    assert timing.choose("op", {"safe": _never, "fast": _never}) == "fast"
    # other candidates (a kernel added or gone) are measured again, not trusted
    monkeypatch.setattr(timing, "race", lambda fns: {"safe": 1.0, "other": 2.0})
    assert timing.choose("op", {"safe": _never, "other": _never}) == "safe"
    monkeypatch.setattr(timing, "race", lambda fns: {"new": 0.1, "safe": 1.0, "fast": 0.5})
    assert timing.choose("op", {"new": _never, "safe": _never, "fast": _never}) == "new"


def test_damaged_cache_is_remeasured(cache, monkeypatch):
    cache.write_text("{not json")
    monkeypatch.setattr(timing, "race", lambda fns: {"a": 1.0, "b": 0.1})
    assert timing.choose("op", {"a": _never, "b": _never}) == "b"
    assert json.loads(cache.read_text())[timing.cpu_fingerprint()] == {"op among a,b": "b"}


def test_race_times_every_candidate():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    times = timing.race({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3)
    assert set(times) == {"a", "b"} and all(0 <= t < 1 for t in times.values())
    assert calls["a"] >= 2 and calls["b"] >= 2


def test_fingerprint_names_cpu_flags_and_threads():
    fp = timing.cpu_fingerprint()
    assert "threads=" in fp and "torch" in fp


def test_a_hopeless_candidate_runs_once():
    """A kernel whose first call is far slower than the fastest's costs that call, not rounds of them."""
    import time as _time

    from deepsqueeze.core.timing import race

    calls = {"slow": 0}

    def slow() -> None:
        calls["slow"] += 1
        _time.sleep(0.05)

    times = race({"fast": lambda: sum(range(10)), "slow": slow})
    assert calls["slow"] == 1 and times["slow"] >= 0.05 and times["fast"] < times["slow"]

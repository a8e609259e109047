import json

import benchmarks.qat_cnn as bench
import benchmarks.runner as runner
from benchmarks.runner import BenchContext


def test_kept_rows_come_only_from_other_models_and_name_their_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path)
    old = {"commit": "abc1234", "date": "2026-11-30", "wall_s": 12.0, "threads": 2,
           "notes": ["Brevitas on vgg-small w4a8: did not run", "something about lenet5"],
           "rows": [{"model": "lenet5", "config": "fp32"}, {"model": "vgg-small", "config": "fp32"},
                    {"model": "vgg-small", "config": "binary", "run": "def5678 2026-11-29"}]}
    (tmp_path / f"{bench.NAME}.json").write_text(json.dumps(old))
    ctx = BenchContext()
    kept = bench._kept_rows(ctx, ["lenet5"])
    assert [r["model"] for r in kept] == ["vgg-small", "vgg-small"]
    assert [r["run"] for r in kept] == ["abc1234 2026-11-30", "def5678 2026-11-29"]
    assert any("vgg-small" in n and "earlier run" in n for n in ctx.notes)
    assert "Brevitas on vgg-small w4a8: did not run" in ctx.notes
    assert "something about lenet5" not in ctx.notes


def test_nothing_is_kept_without_a_stored_result(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path)
    assert bench._kept_rows(BenchContext(), ["lenet5"]) == []


def test_qat_minilm_keeps_the_rows_of_other_widths(tmp_path, monkeypatch):
    import benchmarks.qat_minilm as minilm

    monkeypatch.setattr(runner, "RESULTS_DIR", tmp_path)
    old = {"commit": "abc1234", "date": "2026-11-30", "rows": [
        {"method": "fp32", "bits": 32}, {"method": "gptq", "bits": 4}, {"method": "qat", "bits": 4}]}
    (tmp_path / f"{minilm.NAME}.json").write_text(json.dumps(old))
    ctx = BenchContext()
    kept = minilm._kept_rows(ctx, [3])
    assert [(r["method"], r["run"]) for r in kept] == [("gptq", "abc1234 2026-11-30"), ("qat", "abc1234 2026-11-30")]
    assert minilm._kept_rows(ctx, [4]) == []  # the fp32 row is always measured again
    assert any("4 bits" in n for n in ctx.notes)

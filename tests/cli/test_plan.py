"""``deepsqueeze plan`` and the coverage summary of ``compress`` (issue 11, item 1)."""

import json

from deepsqueeze.testing.cli import run

GPT2 = "py:deepsqueeze.testing.user_models:gpt2_lm"




def test_plan_json_for_every_shipped_quant_recipe_covers_gpt2(capsys):
    for recipe in ("int8-dynamic", "w4-rtn", "int8-static", "w4-gptq"):
        code, out, err = run(capsys, "plan", "--model", GPT2, "--recipe", recipe, "--data", "pydoc-sentences:calib",
                             "--json")
        assert code == 0, err
        plan = json.loads(out)
        quant = [s for s in plan["stages"] if s["type"] == "quantize"]
        assert quant and all(s["covered_pct"] == 100.0 for s in quant), (recipe, quant)
        names = {m["module"] for m in plan["modules"] if m["action"] == "compressed"}
        assert "transformer.h.1.mlp.c_fc" in names and "lm_head" in names


def test_plan_shows_structured_groups_with_reasons(capsys, workdir):
    (workdir / "ch.yaml").write_text("stages:\n  - type: prune_channels\n    ratio: 0.5\n    epochs: 0\n")
    code, out, err = run(capsys, "plan", "--model", "py:deepsqueeze.testing.user_models:DictDetector",
                         "--recipe", "ch.yaml", "--json")
    assert code == 0, err
    rows = {m["module"]: m for m in json.loads(out)["modules"]}
    assert rows["backbone.0"]["action"] == "compressed"
    assert rows["box"]["action"] == "skipped" and "reaches the model output" in rows["box"]["reason"]


def test_compress_prints_coverage_and_stores_it(capsys, workdir):
    (workdir / "q.yaml").write_text("stages:\n  - type: quantize\n    method: dynamic\n")
    code, out, err = run(capsys, "compress", "--model", GPT2, "--recipe", "q.yaml", "--out", "g.dsq", "--json")
    assert code == 0, err
    assert json.loads(out)["coverage"][0]["covered_pct"] == 100.0
    from deepsqueeze.artifact import load

    manifest = load(workdir / "g.dsq", model=GPT2).meta["manifest"]
    assert {e["module"] for e in manifest["coverage"]} >= {"transformer.h.0.attn.c_attn", "lm_head"}


def test_on_unsupported_error_refuses_before_writing(capsys, workdir):
    (workdir / "b.yaml").write_text("on_unsupported: error\nstages:\n  - type: quantize\n    method: binary\n"
                                    "    bits: 2\n")
    code, out, err = run(capsys, "compress", "--model", "py:deepsqueeze.testing.user_models:RecurrentTagger",
                         "--recipe", "b.yaml", "--out", "r.dsq")
    assert code == 2 and "lstm" in err and "Traceback" not in err
    assert not (workdir / "r.dsq").exists()

"""The conformance matrix (issue 24): every command x shipped recipe x model kind works or is refused in one line.

``plan`` runs on every cell; the whole pipeline (compress, inspect, evaluate, export onnx and hf, report, load
then call, search with one trial) on the fixed covering subset; ``make conformance`` runs every cell.
"""

from __future__ import annotations

import inspect as pyinspect

import pytest

from deepsqueeze.testing import conformance as cf


def test_the_matrix_is_built_from_the_registries():
    from deepsqueeze.cli.app import app
    from deepsqueeze.testing.hf_models import FAMILIES, REFUSED_FAMILIES

    cli_commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {c.split("-")[0] for c in cf.COMMANDS} | set(cf.NOT_MODEL_COMMANDS)
    assert set(cf.NOT_MODEL_COMMANDS) <= cli_commands, "NOT_MODEL_COMMANDS names a command the CLI lacks"
    assert cli_commands <= covered, f"commands the matrix does not run: {sorted(cli_commands - covered)}"
    assert {f"hf-{f}" for f in [*FAMILIES, *REFUSED_FAMILIES]} <= set(cf.KINDS)
    from deepsqueeze.testing import user_models

    classes = {n for n, obj in vars(user_models).items() if pyinspect.isclass(obj) and obj.__module__ ==
               user_models.__name__ and not n.startswith("_") and n != "TiedLM"}
    factories = {k.code.rsplit(":", 1)[1] for k in cf.KINDS.values() if k.code}
    assert classes <= factories, f"user model kinds missing from the matrix: {classes - factories}"
    pairs = cf.covering_subset()
    assert {r for r, _ in pairs} == set(cf.recipes()) and {k for _, k in pairs} == set(cf.KINDS)


def test_every_model_command_takes_the_same_model_options():
    import typer.main

    from deepsqueeze.cli._common import MODEL_OPTIONS
    from deepsqueeze.cli.app import app

    group = typer.main.get_command(app)
    helps: dict[str, set[str]] = {}
    for name in {c.split("-")[0] for c in cf.COMMANDS} - {"load"}:  # load: the Python API
        params = {opt: p for p in group.commands[name].params for opt in getattr(p, "opts", [])}
        missing = [o for o in MODEL_OPTIONS if o not in params]
        assert not missing, f"{name} lacks {missing}"
        for option in MODEL_OPTIONS:
            helps.setdefault(option, set()).add(params[option].help)
    assert all(len(texts) == 1 for texts in helps.values()), "a model option is declared twice with other help"


def test_coverage_md_lists_every_recipe_and_kind():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "COVERAGE.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| recipe |"))
    assert set(header.strip("| ").split(" | ")[1:]) == set(cf.KINDS), "regenerate COVERAGE.md: make conformance"
    rows = {line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| ")}
    assert set(cf.recipes()) <= rows, "regenerate COVERAGE.md: make conformance"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return cf.run_matrix(tmp_path_factory.mktemp("conformance"), cf.covering_subset())


def test_no_cell_fails(matrix):
    failed = [f"{c.command} {c.recipe} on {c.kind}: exit {c.code}: {c.message}" for c in matrix
              if c.outcome == cf.FAILED]
    assert not failed, "\n".join(failed)


def test_every_command_works_somewhere_and_every_compress_refusal_is_planned(matrix):
    works = {c.command for c in matrix if c.outcome in (cf.WORKS, cf.OVER_BUDGET)}
    assert set(cf.COMMANDS) <= works, f"commands that never worked: {set(cf.COMMANDS) - works}"
    plans = {(c.recipe, c.kind): c.outcome for c in matrix if c.command == "plan"}
    for cell in matrix:
        if cell.command == "compress" and cell.outcome == cf.REFUSED:
            assert plans[cell.recipe, cell.kind] == cf.REFUSED
    assert len(plans) == len(cf.recipes()) * len(cf.KINDS)


# Cells the full matrix (make conformance) found refused by compress after plan accepted them.
PLANNED_REFUSALS = [("distill-lenet300", "hf-gpt2"), ("qat-w8a8", "hf-gpt2"), ("qat-w4-minilm", "hf-bert-classifier"),
                    ("prune-transformer", "cnn-residual"), ("finetune", "convtranspose")]


@pytest.mark.parametrize("recipe, kind", PLANNED_REFUSALS)
def test_plan_refuses_what_compress_refuses(recipe, kind, tmp_path):
    plan, compress = cf.run_cell(recipe, cf.KINDS[kind], tmp_path, commands=("plan", "compress"))
    assert plan.outcome == cf.REFUSED and compress.outcome == cf.REFUSED, (plan, compress)
    assert not (tmp_path / "cells" / f"{kind}--{recipe}" / "model.dsq").exists()

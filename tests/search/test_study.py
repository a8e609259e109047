"""End to end on a tiny model: trials run through compress, the front's recipes replay to the same bytes,
the answer names the failed constraint, and Ctrl-C then the same command resumes the study."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from deepsqueeze.cli.app import main
from deepsqueeze.data import resolve_data
from deepsqueeze.recipes.budget import EXIT_OVER_BUDGET
from deepsqueeze.search import hypervolume, load_space, pareto_front, run_search, write_answer
from deepsqueeze.search.storage import default_storage
from deepsqueeze.search.study import make_sampler
from deepsqueeze.testing.cli import foreground_sigint

SPACE = {
    "model": "zoo:lenet300@digits",
    "data": "digits",
    "objectives": ["quality", "bytes"],
    "latency": {"batch": 32, "threads": 1},
    "stages": [
        {"type": "prune", "optional": True, "storage": "dense", "sparsity": {"choice": [0.5, 0.8]}},
        {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [2, 4, 8]}}},
    ],
}


def write_space(folder: Path, **changes) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, lenet300_digits):
    folder = tmp_path_factory.mktemp("search")
    space, model = load_space(write_space(folder))
    result = run_search(space, model, folder / "out", sampler="random", trials=3)
    return folder, space, result


def test_trials_are_measured_on_the_validation_split(searched):
    folder, _, result = searched
    assert result.complete == 3 and result.failed == 0
    assert result.baseline["validation"] == "digits:val"
    assert result.baseline["validation_samples"] == len(resolve_data("digits:val").test_y)
    study = optuna.load_study(study_name="search", storage=default_storage(folder / "out"))
    for trial in study.trials:
        attrs = trial.user_attrs
        artifact = Path(attrs["artifact"])
        assert attrs["bytes"] == artifact.stat().st_size  # the written file's bytes, not an estimate
        assert attrs["recipe"]["data"] == "digits:val"  # trained/calibrated without the validation rows
        assert trial.values == [attrs["quality"], attrs["bytes"]]


def test_front_recipes_replay_to_the_same_artifact_bytes(searched, tmp_path, capsys):
    folder, _, result = searched
    assert result.front
    for row in result.front:
        out = tmp_path / f"replay-{row['trial']}.dsq"
        with pytest.raises(SystemExit) as info:
            main(["compress", "--recipe", row["recipe_file"], "--out", str(out), "--json"])
            sys.exit(0)
        # a front point may be over the default quality budget: written all the same, with exit code 3
        assert (info.value.code or 0) in (0, EXIT_OVER_BUDGET), capsys.readouterr().err
        assert hashlib.sha256(out.read_bytes()).hexdigest() == row["artifact_sha256"]


def test_front_is_the_non_dominated_set_and_best_is_written(searched):
    folder, space, result = searched
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert [r["trial"] for r in summary["front"]] == [r["trial"] for r in result.front]
    assert sorted(p.name for p in (folder / "out" / "front").glob("*.yaml")) == sorted(
        f"trial-{r['trial']:04d}.yaml" for r in result.front)
    assert result.feasible and (folder / "out" / "best.yaml").exists()
    assert result.best["quality"] == max(r["quality"] for r in result.front)


def test_no_feasible_point_names_the_constraint_and_the_shortfall(searched):
    folder, space, result = searched
    study = optuna.load_study(study_name="search", storage=default_storage(folder / "out"))
    smallest = min(r["bytes"] for r in result.front)
    space.constraints = {"max_bytes": smallest - 1000}
    answer = write_answer(study, space, folder / "out", "sqlite", "search")
    assert not answer.feasible and answer.best["bytes"] == smallest
    assert answer.message.startswith(f"no trial meets the constraints; the closest is trial {answer.best['trial']}")
    assert f"max_bytes {smallest - 1000:,} B missed by 1,000 B" in answer.message
    space.constraints = {}


def test_pareto_front_and_hypervolume_by_hand():
    points = [(0, [0.9, 100.0]), (1, [0.8, 50.0]), (2, [0.7, 80.0]), (3, [0.9, 100.0])]
    assert pareto_front(points, ["maximize", "minimize"]) == [0, 1, 3]
    # reference (quality 0.5, 200 B): boxes 0.4 x 100 and (0.8 - 0.5) x (100 - 50) = 40 + 15
    assert hypervolume([[0.9, 100.0], [0.8, 50.0]], [0.5, 200.0], ["maximize", "minimize"]) == pytest.approx(55.0)
    assert hypervolume([[0.4, 10.0]], [0.5, 200.0], ["maximize", "minimize"]) == 0.0


def test_hypervolume_history_above_a_quality_floor():
    """A reference at a max_drop floor counts only the points above it: a tiny, useless model adds nothing."""
    from deepsqueeze.search.front import hypervolume_history

    trials = [{"quality": 0.2, "bytes": 10}, {"quality": 0.95, "bytes": 50}]
    baseline = {"bytes": 100, "latency_ms": 1.0}
    # reference (0, 1): 0.2 x (1 - 0.1) + (0.95 - 0.2) x (1 - 0.5) = 0.18 + 0.375
    assert hypervolume_history(trials, ("quality", "bytes"), baseline)[-1] == pytest.approx(0.555)
    floor = hypervolume_history(trials, ("quality", "bytes"), baseline, reference={"quality": 0.9})
    assert floor == pytest.approx([0.0, 0.05 * 0.5])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_then_the_same_command_resumes(tmp_path, lenet300_digits, sig, capsys):
    space = write_space(tmp_path)
    out = tmp_path / "out"
    argv = ["search", "--space", str(space), "--out", str(out), "--trials", "4", "--sampler", "random"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "deepsqueeze", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=foreground_sigint)
    lines = []
    for line in proc.stderr:  # progress lines: interrupt as soon as the first trial is reported
        lines.append(line)
        if line.startswith("trial 0:"):
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=180)
    err = "".join(lines) + err
    assert any(line.startswith("trial 0: quality") for line in lines), err
    study = optuna.load_study(study_name="search", storage=default_storage(out))
    first = {t.number: t.user_attrs["artifact_sha256"] for t in study.trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    if len(first) == 4:
        pytest.skip("the study finished before the interrupt arrived")
    assert proc.returncode == 128 + sig and "Traceback" not in err and "run the same command to resume" in err, err
    assert ": created" in err and "Using an existing study" not in err, err
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # marked failed
    assert json.loads((out / "summary.json").read_text())["complete"] >= 1  # the answer so far is written
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None)
    said = "".join(capsys.readouterr().err.split())  # joined: the console may wrap the line
    assert "continued(" in said and "trialsstored)" in said, said  # deepsqueeze's own load report
    study = optuna.load_study(study_name="search", storage=default_storage(out))
    complete = {t.number: t.user_attrs["artifact_sha256"] for t in study.trials
                if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(complete) == 4 and len(first) < 4
    assert all(complete[n] == sha for n, sha in first.items())  # trials done before Ctrl-C were kept


@pytest.mark.parametrize("extra, needle", [
    (["--space", "missing.yaml"], "does not exist"),
    (["--sampler", "bayes"], "unknown sampler 'bayes'"),
    (["--storage", "mysql://x"], "--storage takes"),
])
def test_bad_search_input_is_one_line_exit_2(tmp_path, capsys, lenet300_digits, extra, needle):
    space = write_space(tmp_path)
    argv = ["search", "--space", str(space), "--out", str(tmp_path / "out"), "--trials", "1", *extra]
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_single_objective_trials_report_a_validation_score_after_each_stage(tmp_path, lenet300_digits):
    """What the pruners (median, successive halving) decide on: the validation score after every stage but the
    last, reported through Optuna's trial.report."""
    space, model = load_space(write_space(tmp_path, objectives=["quality"], constraints={"max_bytes": 40000}))
    result = run_search(space, model, tmp_path / "out", sampler="tpe", trials=2, pruner="halving")
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    for trial in study.trials:
        stages = trial.user_attrs["recipe"]["stages"]
        steps = sorted(trial.intermediate_values)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert steps == list(range(len(stages) - 1)) and trial.value == trial.user_attrs["quality"]
        else:  # pruned after the stage whose score fell behind
            assert trial.state == optuna.trial.TrialState.PRUNED and steps == list(range(len(steps)))
    assert result.complete + result.pruned == 2


@pytest.mark.parametrize("name", ["grid", "random", "tpe", "gp", "nsga2"])
def test_every_sampler_is_built_for_the_space(name):
    from deepsqueeze.search import parse_space

    space = parse_space({"stages": [{"type": "prune", "sparsity": {"choice": [0.5, 0.8]}}],
                         "constraints": {"max_bytes": 1000}})
    assert make_sampler(name, space, trials=8, seed=0) is not None


def test_cmaes_refuses_several_objectives():
    from deepsqueeze.errors import RecipeError
    from deepsqueeze.search import parse_space

    space = parse_space({"stages": [{"type": "prune", "sparsity": {"low": 0.1, "high": 0.9}}]})
    with pytest.raises(RecipeError, match="cmaes optimizes one objective"):
        make_sampler("cmaes", space, trials=8, seed=0)
    space.objectives = ("quality",)
    assert make_sampler("cmaes", space, trials=8, seed=0) is not None


def test_sensitivity_priors_seed_the_first_trials(tmp_path, lenet300_digits):
    """priors: sensitivity scans each layer once per study and enqueues per-layer sparsities allocated from it."""
    space, model = load_space(write_space(tmp_path, priors="sensitivity", stages=[
        {"type": "prune", "storage": "dense", "sparsity": {"per_layer": {"low": 0.3, "high": 0.9, "step": 0.1}}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=1)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    curves = study.user_attrs["sensitivity"]
    assert set(curves) == {"1", "3", "5"} and all(c[0][0] == 0.0 for c in curves.values())
    first = study.trials[0]
    assert first.user_attrs["prior"].startswith("sensitivity")
    assert set(first.params) == {"0.prune.sparsity[1]", "0.prune.sparsity[3]", "0.prune.sparsity[5]"}
    assert all(0.3 <= v <= 0.9 for v in first.params.values())
    assert len(study.trials) == 2 and study.trials[1].state == optuna.trial.TrialState.WAITING  # second prior


@pytest.mark.parametrize("stage", [{"type": "quantize", "method": "rtn"}, {"type": "share"}])
def test_bit_sensitivity_priors_allocate_per_layer_widths(stage, tmp_path, lenet300_digits):
    """priors: sensitivity also scans each quantized (or shared) layer at each width and enqueues mixed-precision
    points (one stage with per-layer bits) at mean widths spread over the hole's choices."""
    space, model = load_space(write_space(tmp_path, priors="sensitivity", stages=[
        {"type": "prune", "optional": True, "storage": "dense", "sparsity": {"choice": [0.5, 0.8]}},
        {**stage, "bits": {"per_layer": {"choice": [2, 4, 8]}}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=1)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    sensitivity = study.user_attrs[f"bit_sensitivity[1.{stage['type']}]"]
    assert set(sensitivity) == {"1", "3", "5"}
    assert all(s["2"] >= s["4"] >= s["8"] >= 0 for s in sensitivity.values())  # narrower moves the output more
    priors = [t for t in study.trials if t.user_attrs.get("prior", "").startswith("bit sensitivity")]
    assert len(priors) == 3 and all(t.params["0.prune.run"] is False for t in priors if t.params)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert first.user_attrs["recipe"]["stages"][0]["overrides"] == {
        n: first.params[f"1.{stage['type']}.bits[{n}]"] for n in ("1", "3", "5")}


def test_bit_priors_sit_at_the_weight_bytes_of_each_compare_recipe(tmp_path, lenet300_digits):
    """A `compare` recipe at one width (w4-rtn: 4 bits, group 32) gets a prior allocated under exactly its
    layers' weight bytes, at its group size, so the front has a point no larger than the reference."""
    from deepsqueeze.quant.mixed import packed_weight_bytes

    space, model = load_space(write_space(tmp_path, priors="sensitivity", compare=["w4-rtn"], stages=[
        {"type": "quantize", "method": "rtn", "symmetric": False, "group_size": {"choice": [32, 64]},
         "bits": {"per_layer": {"choice": [2, 3, 4, 8]}}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=1)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    matched = [t for t in study.trials if "weight bytes of w4-rtn" in t.user_attrs.get("prior", "")]
    assert len(matched) == 1
    params = matched[0].params or matched[0].system_attrs["fixed_params"]  # still waiting: its enqueued params
    assert params["0.quantize.group_size"] == 32
    shapes = {n: tuple(model.module.get_submodule(n).weight.shape) for n in ("1", "3", "5")}
    widths = {n: params[f"0.quantize.bits[{n}]"] for n in shapes}
    spent = sum(packed_weight_bytes(r, c, widths[n], 32) for n, (r, c) in shapes.items())
    assert spent <= sum(packed_weight_bytes(r, c, 4, 32) for r, c in shapes.values())
    assert study.user_attrs["references"][0]["recipe"] == "w4-rtn"


def test_a_reference_prior_is_no_larger_than_the_reference_file(tmp_path, lenet300_digits):
    """mixed-precision spends fewer weight bytes than uniform 4 bits (its widths leave slack) and its
    manifest is smaller than a point's with one width per layer: the prior placed at its size is allocated
    under the weight bytes its measured file spends, then corrected by the measured excess, so a point of
    the study is no larger than the reference's file."""
    space, model = load_space(write_space(tmp_path, priors="sensitivity", compare=["mixed-precision"], stages=[
        {"type": "quantize", "method": "rtn", "symmetric": False, "group_size": {"choice": [64, 128]},
         "bits": {"per_layer": {"choice": [2, 3, 4, 5, 6, 8]}}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=6)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    reference = study.user_attrs["references"][0]
    placed = [t for t in study.trials if "weight bytes of mixed-precision" in t.user_attrs.get("prior", "")
              and t.state == optuna.trial.TrialState.COMPLETE]
    assert placed
    assert min(t.user_attrs["bytes"] for t in placed) <= reference["bytes"]
    assert all(t.user_attrs["prior_target_bytes"] == reference["bytes"] for t in placed)


def test_a_repeated_recipe_is_not_measured_again_nor_counted(tmp_path, lenet300_digits):
    """A proposal equal to a measured recipe (NSGA-II's crossover of a small population repeats its parents)
    yields the same artifact: it is pruned as a repeat, writes nothing and does not use up a trial."""
    space, model = load_space(write_space(tmp_path, stages=[
        {"type": "quantize", "method": "rtn", "bits": {"choice": [2, 3, 4, 8]}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=1)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    study.enqueue_trial(study.trials[0].params)
    result = run_search(space, model, tmp_path / "out", sampler="random", trials=2)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    repeat = study.trials[1]
    assert repeat.state == optuna.trial.TrialState.PRUNED and repeat.user_attrs["repeat_of"] == 0
    assert "bytes" not in repeat.user_attrs and not (tmp_path / "out" / "trials" / "trial-0001.dsq").exists()
    assert result.repeats >= 1 and result.pruned == 0
    assert result.complete + result.repeats == len(study.trials)
    measured = [t.user_attrs["recipe"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(measured) == result.complete and all(measured.count(r) == 1 for r in measured)


def test_a_space_smaller_than_the_trials_stops_and_says_so(tmp_path, lenet300_digits):
    """Three recipes in the space, five trials asked: the sampler's repeats are not measured, the study
    stops instead of looping, and the answer says why it holds fewer trials."""
    space, model = load_space(write_space(tmp_path, stages=[
        {"type": "quantize", "method": "rtn", "bits": {"choice": [2, 4, 8]}}]))
    result = run_search(space, model, tmp_path / "out", sampler="random", trials=5)
    assert result.complete == 3 and result.repeats >= 1
    assert "stopped at 3 of 5 trials" in result.message
    assert "stopped at 3 of 5" in json.loads((tmp_path / "out" / "summary.json").read_text())["message"]


def test_nsga2_first_generation_holds_sampled_individuals_beside_the_priors(tmp_path, lenet300_digits):
    """Priors alone would fill NSGA-II's first generation and every child would descend from them: the first
    generation is the priors plus trials // 4 (at least 4) sampled individuals (TPE's random start-up, too,
    comes on top of the priors)."""
    space, model = load_space(write_space(tmp_path, priors="sensitivity", stages=[
        {"type": "prune", "optional": True, "storage": "dense", "sparsity": {"choice": [0.5, 0.8]}},
        {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [2, 4, 8]}}}]))
    run_search(space, model, tmp_path / "out", sampler="nsga2", trials=8)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    priors = study.user_attrs["seeded_points"]
    assert priors >= 3
    first = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
             if t.system_attrs.get("NSGAIISampler:generation") == 0]
    assert sum("prior" in t.user_attrs for t in first) == priors
    assert sum("prior" not in t.user_attrs for t in first) == min(4, 8 - priors)
    assert make_sampler("tpe", space, trials=24, seed=0, seeded=priors)._n_startup_trials == 6 + priors


def test_search_takes_the_users_own_model_weights_and_code(tmp_path, capsys):
    """Issue 24 finding 7: no --weights (the untrained py: model was searched), no --model-code (every trial
    failed asking for it) and exit 0 with 'run the same command again'."""
    from safetensors.torch import save_file

    from deepsqueeze.testing.models import PlainMLP
    from deepsqueeze.train.loop import seed_everything, train_classifier

    seed_everything(0)
    module = PlainMLP()
    digits = resolve_data("digits")
    train_classifier(module, digits, epochs=3, lr=3e-3, batch_size=64, progress=False)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "w.safetensors"))
    space = tmp_path / "space.yaml"
    space.write_text("stages:\n  - type: quantize\n    method: rtn\n    bits: {choice: [4, 8]}\n")
    ref = "py:deepsqueeze.testing.models:PlainMLP"
    argv = ["search", "--space", str(space), "--model", ref, "--data", "digits", "--trials", "2", "--sampler",
            "grid", "--json"]
    from deepsqueeze.testing.cli import run

    # the py: factory named by --model also rebuilds the trials
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "s"), "--weights", str(tmp_path / "w.safetensors"))
    assert code == 0, err
    result = json.loads(out)
    assert result["complete"] == 2 and result["baseline"]["quality"] > 0.8  # the trained weights, not a random net
    # every trial fails (code of another architecture): said, exit 2
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "t"), "--weights", str(tmp_path / "w.safetensors"),
                         "--model-code", "py:deepsqueeze.testing.models:TinyMLP")
    assert code == 2 and "all 2 trials failed" in err and len(err.strip().splitlines()) == 1, err


def test_search_under_torchrun_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Issue 24 finding 8: under torchrun every rank trained a different recipe in one process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    space = tmp_path / "space.yaml"
    space.write_text("model: zoo:lenet300\nstages:\n  - type: quantize\n    method: dynamic\n")
    with pytest.raises(SystemExit) as info:
        main(["search", "--space", str(space), "--out", str(tmp_path / "s"), "--data", "digits"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "torchrun" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_a_recipe_another_worker_is_measuring_is_a_repeat(tmp_path, lenet300_digits):
    """Issue 24 finding 8: duplicates were checked against finished trials only, so workers sharing a study
    measured the same recipe at once. An earlier RUNNING trial with the same recipe makes the new one a repeat."""
    import copy

    space, model = load_space(write_space(tmp_path, stages=[
        {"type": "quantize", "method": "rtn", "bits": {"choice": [2, 3, 4, 8]}}]))
    run_search(space, model, tmp_path / "out", sampler="random", trials=1)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    first = study.trials[0]
    (key, value), = first.params.items()
    other = next(b for b in (2, 3, 4, 8) if b != value)
    form = copy.deepcopy(first.user_attrs["recipe"])
    form["stages"][0]["bits"] = other
    running = study.ask()  # another worker, measuring `other` right now
    running.set_user_attr("recipe", form)
    study.enqueue_trial({key: other})
    run_search(space, model, tmp_path / "out", sampler="random", trials=2)
    study = optuna.load_study(study_name="search", storage=default_storage(tmp_path / "out"))
    proposed = study.trials[running.number + 1]
    assert proposed.params[key] == other
    assert proposed.state == optuna.trial.TrialState.PRUNED and proposed.user_attrs["repeat_of"] == running.number


@pytest.mark.parametrize("objectives", [("quality", "bytes"), ("quality", "bytes", "latency")])
def test_hypervolume_history_equals_the_front_of_every_prefix(objectives):
    """The report of a 300-trial study took 24 s (a new Pareto front per trial): the history is now kept
    incrementally and must equal the hypervolume of each prefix's front, repeated points included."""
    import random

    from deepsqueeze.search.front import (
        DIRECTIONS,
        HV_REFERENCE,
        hypervolume,
        hypervolume_history,
        normalized_values,
        pareto_front,
    )

    rng = random.Random(0)
    baseline = {"bytes": 1000.0, "latency_ms": 10.0}
    trials = [{"quality": rng.choice([0.5, 0.7, 0.9, rng.random()]), "bytes": rng.choice([200, 500, rng.randint(1, 999)]),
               "latency_ms": rng.choice([5.0, rng.uniform(1, 19)])} for _ in range(60)]
    trials += trials[:5]
    directions = [DIRECTIONS[o] for o in objectives]
    corner = [HV_REFERENCE[o] for o in objectives]
    expected = []
    for n in range(1, len(trials) + 1):
        points = [normalized_values(t, objectives, baseline) for t in trials[:n]]
        front = pareto_front(list(enumerate(points)), directions)
        expected.append(hypervolume([points[i] for i in front], corner, directions))
    assert hypervolume_history(trials, objectives, baseline) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_optuna_logs_only_what_deepsqueeze_does_not_say_itself(caplog):
    """optuna's logging is not silenced: its per-trial records (said by the search itself) are dropped, any
    other warning passes as one line."""
    import logging
    import sys

    from deepsqueeze.search.storage import _OwnTrialReports, own_trial_reports

    own_trial_reports()
    keep = _OwnTrialReports()
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info()
    failed = logging.LogRecord("optuna", logging.WARNING, "", 0, "Trial 3 failed with parameters: {}", (), info)
    finished = logging.LogRecord("optuna", logging.INFO, "", 0, "Trial 3 finished with value: 0.9", (), None)
    other = logging.LogRecord("optuna", logging.WARNING, "", 0, "GPSampler falls back to random", (), info)
    loaded = logging.LogRecord("optuna", logging.INFO, "", 0, "Using an existing study with name 's' instead of "
                               "creating a new one.", (), None)
    note = logging.LogRecord("optuna", logging.INFO, "", 0, "Sampler note", (), None)
    assert not keep.filter(failed) and not keep.filter(finished) and not keep.filter(loaded)
    assert keep.filter(other) and other.exc_info is None and keep.filter(note)
    assert any(isinstance(f, _OwnTrialReports) for h in logging.getLogger("optuna").handlers for f in h.filters)

"""No model reference read from a file reaches code, a training run or a loader the user did not name
(issue 25, finding 1).

A .dsq's free-text ``ref``, a recipe's ``model`` and distillation ``teacher``, a search space's ``model``:
each is set to a canary (an importable module that leaves a mark when imported or called, a folder whose
opening the audit hook records, a zoo model that would have to be trained) and every command that reads
such a file is run on it. Nothing may be imported, opened or trained, and each command ends cleanly
(exit 0, or one line and exit 2). A second test enumerates every call of the model resolvers in the
package and checks that each one's argument comes from the user or through ``resolve_file_reference``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from deepsqueeze.artifact import save
from deepsqueeze.testing.forge import forge_manifest
from deepsqueeze.testing.models import tiny_model_handle

SRC = Path(__file__).resolve().parents[1] / "src" / "deepsqueeze"

# One driver process serves every case of this module (a CLI run per request line on stdin, one JSON line
# back): the audit hook watches the canary folder and canary imports; stdout and stderr of each run are
# captured. A case that imports the canary fails by its mark file and hook record, whatever ran before it.
DRIVER = r"""
import contextlib, io, json, os, sys, traceback
watch = os.environ["CANARY_WATCH"]
hits = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(watch):
            hits.append("open " + path)
    elif event == "import" and args and str(args[0]).startswith("canary_mod"):
        hits.append("import " + str(args[0]))
sys.addaudithook(hook)
reply = sys.stdout
from deepsqueeze.cli.app import main
for line in sys.stdin:
    request = json.loads(line)
    os.environ.update(request["env"])
    sys.modules.pop("canary_mod", None)
    hits.clear()
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(request["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    reply.write(json.dumps({"hits": list(hits), "code": code, "stderr": err.getvalue()}) + "\n")
    reply.flush()
"""


CANARY = textwrap.dedent("""
    import pathlib, os
    pathlib.Path(os.environ["CANARY_MARK"]).write_text("imported")
    def build():
        pathlib.Path(os.environ["CANARY_MARK"]).write_text("called")
        import torch
        return torch.nn.Linear(4, 4)
""")


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    (root / "code").mkdir()
    (root / "code" / "canary_mod.py").write_text(CANARY)
    secret = root / "secret"
    secret.mkdir()
    (secret / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    model = tiny_model_handle()
    save(model, secret / "other.dsq")
    work = root / "work"
    work.mkdir()
    return root


REFS = {
    "py": "py:canary_mod:build",
    "hf": "hf:{secret}",
    "dsq": "{secret}/other.dsq",
    "train": "zoo:lenet5@digits",
    "train-lm": "zoo:gpt-tiny@pydoc",
}


@pytest.fixture(scope="module")
def driver(canary, tmp_path_factory):
    """The module's driver process (see DRIVER)."""
    logs = tmp_path_factory.mktemp("driver")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(canary / "code"), *(p for p in sys.path if p)]),
           "CANARY_WATCH": str((canary / "secret").resolve())}
    with open(logs / "stderr.txt", "w") as stderr:  # a file, never a full pipe
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=canary / "code", stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        yield proc
        proc.stdin.close()
        proc.wait(timeout=60)


def _run(driver: subprocess.Popen, tmp_path: Path, *argv: str) -> dict:
    env = {"CANARY_MARK": str(tmp_path / "mark"), "DEEPSQUEEZE_CACHE": str(tmp_path / "cache")}
    driver.stdin.write(json.dumps({"argv": list(argv), "env": env}) + "\n")
    driver.stdin.flush()
    line = driver.stdout.readline()
    assert line, f"the driver process died (exit {driver.poll()}): see its stderr.txt"
    result = json.loads(line)
    result["trained"] = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    result["mark"] = (tmp_path / "mark").exists()
    return result


def _check_clean(result: dict) -> None:
    assert not result["mark"], "the canary module was imported or called"
    assert not result["hits"], result["hits"]
    assert not result["trained"], f"a file started a training run: {result['trained']}"
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert result["code"] in (0, 2), (result["code"], result["stderr"][-3000:])
    if result["code"] == 2:
        assert len(result["stderr"].strip().splitlines()) == 1, result["stderr"]


def _ref(kind: str, canary: Path) -> str:
    return REFS[kind].format(secret=(canary / "secret").resolve())


@pytest.fixture(scope="module")
def zoo_artifact(canary, tmp_path_factory):
    """An artifact of an untrained zoo model: its base is rebuilt from data, so evaluate and report have a
    reference to compare with once they stop reading the forged ``ref``."""
    import deepsqueeze as ds

    out = tmp_path_factory.mktemp("zoo") / "lenet300.dsq"
    ds.compress("zoo:lenet300", ds.load_recipe("int8-dynamic"), out, None, progress=False,
                evaluate_result=False)
    return out


@pytest.mark.parametrize("kind", sorted(REFS))
@pytest.mark.parametrize("command", ["evaluate", "report", "inspect", "export", "compress"])
def test_an_artifacts_ref_reaches_no_resolver(canary, driver, zoo_artifact, tmp_path, kind, command):
    def edit(manifest):
        manifest["ref"] = _ref(kind, canary)

    forged = forge_manifest(zoo_artifact, tmp_path / "forged.dsq", edit)
    argv = {
        "evaluate": ["evaluate", str(forged), "--data", "fashion-mnist", "--batch-size", "8"],
        "report": ["report", str(forged), "--out", str(tmp_path / "r.html")],
        "inspect": ["inspect", str(forged), "--json"],
        "export": ["export", str(forged), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "compress": ["compress", "--model", str(forged), "--recipe", "int8-dynamic", "--out", str(tmp_path / "c.dsq")],
    }[command]
    if command in ("evaluate",) and not _fashion_mnist():
        argv = ["evaluate", str(forged), "--data", "digits", "--no-latency"]  # fails on shape, still reads ref
    _check_clean(_run(driver, tmp_path, *argv))


def _fashion_mnist() -> bool:
    from deepsqueeze.data.fashion_mnist import fashion_mnist_dir

    return (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists()


@pytest.mark.parametrize("kind", sorted(REFS))
@pytest.mark.parametrize("where", ["recipe-model", "recipe-teacher", "plan", "space"])
def test_a_recipe_or_space_reference_reaches_no_resolver(canary, driver, tmp_path, kind, where):
    ref = _ref(kind, canary)
    if where == "space":
        (tmp_path / "space.yaml").write_text(yaml.safe_dump({
            "model": ref, "stages": [{"type": "quantize", "method": "rtn", "bits": {"choice": [4, 8]}}]}))
        argv = ["search", "--space", str(tmp_path / "space.yaml"), "--data", "digits", "--trials", "1",
                "--out", str(tmp_path / "study")]
    elif where == "recipe-teacher":
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({
            "stages": [{"type": "distill", "student": "self", "teacher": ref, "epochs": 0.01}]}))
        argv = ["compress", "--model", "py:deepsqueeze.testing.models:TinyMLP", "--data", "digits",
                "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "c.dsq")]
    else:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": ref, "data": "digits",
                                                          "stages": [{"type": "quantize", "method": "dynamic"}]}))
        argv = (["plan", "--recipe", str(tmp_path / "r.yaml")] if where == "plan" else
                ["compress", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "c.dsq")])
    result = _run(driver, tmp_path, *argv)
    _check_clean(result)
    assert result["code"] == 2 and ref.split(":")[0] in result["stderr"], result["stderr"]


def test_a_file_reference_the_user_names_again_is_theirs(canary, driver, tmp_path):
    """Naming the same reference on the command line is the user's choice: the file's default then applies."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": "py:canary_mod:build",
                                                      "stages": [{"type": "quantize", "method": "dynamic"}]}))
    result = _run(driver, tmp_path, "plan", "--recipe", str(tmp_path / "r.yaml"), "--model", "py:canary_mod:build")
    assert result["code"] == 0 and result["mark"], result["stderr"]


# Every call of a function that imports user code, trains or loads a model by reference. Each call site
# is listed with where its argument comes from; a new call fails this test until it is declared here.
RESOLVERS = {"resolve_model", "resolve_base_model", "_call_factory", "pretrained_zoo_model", "pretrained_gpt_tiny",
             "load_hf_model", "load_gguf_model", "import_module", "resolve_file_reference"}
DECLARED = {
    # (module, function): origin of the reference
    ("resolve", "resolve_model"): "its caller's argument",
    ("resolve", "resolve_file_reference"): "checked by check_file_reference first",
    ("zoo.resolve", "resolve_base_model"): "its caller's argument",
    ("zoo.resolve", "base_reference"): "the validated manifest base (zoo names cached only, hf: the base folder)",
    ("zoo.resolve", "build_base"): "model_code from the caller; hf base config only",
    ("zoo.resolve", "_call_factory"): "its caller's argument",
    ("zoo.hf", "load_sentence_encoder"): "its caller's argument",
    ("recipes.run", "compress"): "the user's --model, else the recipe's model through resolve_file_reference",
    ("recipes.plan", "plan"): "the user's --model, else the recipe's model through resolve_file_reference",
    ("distill.distill", "distill_stage"): "the recipe's teacher through resolve_file_reference",
    ("search.space", "load_space"): "the user's --model, else the space's through resolve_file_reference",
    ("search.trial", "measure_point"): "the trial artifact search itself wrote",
    ("cli.export", "register"): "the user's MODEL argument and --model-code",
    ("cli.generate", "register"): "the user's MODEL argument and --model-code",
    ("cli.inspect", "register"): "the user's MODEL argument",
    ("cli.evaluate", "register"): "the user's MODEL, --reference and --baseline arguments",
    ("cli.sensitivity", "register"): "the user's MODEL argument",
    ("cli.train", "register"): "the user's zoo:NAME and --data arguments",
    ("cli.demo", "compare"): "the demo's fixed references",
    ("report.artifact", "artifact_report"): "the user's --model-code and --weights (a py: base's reference)",
    ("testing.conformance", "_py_weights"): "deepsqueeze.testing's own factories, by a fixed table",
    ("cli.app", None): "deepsqueeze's own command modules",
    ("cli.bench", "benchmarks_runner"): "the checkout's benchmarks package, by a fixed name",
    ("__init__", "__getattr__"): "deepsqueeze's own lazy exports, by a fixed table",
    ("core.plugins", "load_plugins"): "deepsqueeze's built-in technique modules, by a fixed table",
}


def _calls() -> list[tuple[str, str | None, str, int]]:
    found = []
    for file in sorted(SRC.rglob("*.py")):
        module = ".".join(file.relative_to(SRC).with_suffix("").parts)
        tree = ast.parse(file.read_text())

        def visit(node: ast.AST, function: str | None, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                name = function
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and function is None:
                    name = child.name
                if isinstance(child, ast.Call):
                    callee = child.func.attr if isinstance(child.func, ast.Attribute) else getattr(child.func, "id", None)
                    if callee in RESOLVERS:
                        found.append((module, function, callee, child.lineno))
                visit(child, name)

        visit(tree, None)
    return found


def test_every_resolver_call_declares_where_its_reference_comes_from():
    undeclared = [f"{m}:{line} ({fn}) calls {callee}" for m, fn, callee, line in _calls()
                  if (m, fn) not in DECLARED and (m, None) not in DECLARED]
    assert not undeclared, ("a new call of a model resolver: check that its reference comes from the user's own "
                            "arguments or through resolve_file_reference, then declare it in DECLARED:\n"
                            + "\n".join(undeclared))
    stale = [key for key in DECLARED if not any((m, fn) == key or (key[1] is None and m == key[0])
                                                 for m, fn, _, _ in _calls())]
    assert not stale, f"declared call sites that no longer exist (update DECLARED): {stale}"

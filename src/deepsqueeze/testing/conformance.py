"""The conformance matrix: every command x every shipped recipe x every model kind of ``deepsqueeze.testing``.

Each cell ends in exactly one of two outcomes: the command **works** end to end (for ``compress``: the
artifact is written, reloads, runs and its quality is measured; exit 0 within the recipe's budget or the
documented over-budget exit 3) or it is **refused** in one line, exit 2, with no traceback (for
``compress``: only where ``plan`` refuses the same cell, so the refusal comes before any work). Anything
else is **failed**: a traceback, another exit code, or a refusal ``plan`` did not predict.

The matrix is built from the registries: :func:`recipes` (the shipped recipes), :data:`KINDS` (every
family of :mod:`deepsqueeze.testing.hf_models` joins automatically) and :data:`COMMANDS`, checked against
the CLI's registered commands by the test suite. ``make test`` plans every cell and runs the whole pipeline
on :func:`covering_subset`; ``make conformance`` (``python -m deepsqueeze.testing.conformance``) runs every
cell and writes COVERAGE.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["COMMANDS", "KINDS", "Cell", "Kind", "covering_subset", "matrix_markdown", "plan_cell", "recipes",
           "run_cell", "run_matrix"]

WORKS, OVER_BUDGET, REFUSED, FAILED = "works", "works, over budget", "refused", "failed"
EXIT_OVER_BUDGET = 3


@dataclass(frozen=True)
class Kind:
    """A model kind: ``model`` is the reference; ``build(folder)`` writes what it needs (an ``hf:`` folder, a
    weights file) and returns the reference, or ``None`` where the reference needs nothing written.
    ``data``: what compress, evaluate and search are given. ``code``: the architecture for ``--model-code``
    (``py:`` kinds). ``weights``: the kind is loaded with a ``--weights`` file written by ``build``."""

    name: str
    description: str
    data: str | None
    model: str = ""
    build: Callable[[Path], str] | None = None
    code: str | None = None
    weights: bool = False

    def args(self, folder: Path) -> list[str]:
        """The model options every command takes for this kind, building what it needs under ``folder``."""
        ref = self.build(folder / self.name) if self.build is not None else self.model
        out = ["--model", ref]
        if self.weights:
            out += ["--weights", str(folder / self.name / "model.safetensors")]
        data = self.data_ref(folder)
        return out + (["--data", data] if data else [])

    def data_ref(self, folder: Path) -> str | None:
        """``--data`` for this kind: text kinds get :data:`SENTENCES` sentences of pydoc (a declared
        substitution, as tiny models are: the shipped recipes' epochs over the whole corpus take minutes)."""
        if self.data != TEXT:
            return self.data
        file = folder / "sentences.txt"
        if not file.exists():
            from deepsqueeze.data import resolve_data

            sentences = resolve_data("pydoc-sentences:calib").sentences[:SENTENCES]  # type: ignore[union-attr]
            file.write_text("\n".join(s.replace("\n", " ") for s in sentences) + "\n", encoding="utf-8")
        return f"text:{file}"


TEXT, SENTENCES = "sentences", 96


def _py(factory: str) -> str:
    return f"py:deepsqueeze.testing.{factory}"


def _hf(family: str) -> Callable[[Path], str]:
    def build(folder: Path) -> str:
        from deepsqueeze.testing.hf_models import make_hf_dir

        if not (folder / "config.json").exists():
            with _quiet():
                make_hf_dir(family, folder)
        return f"hf:{folder}"
    return build


def _st_dense(folder: Path) -> str:
    from deepsqueeze.testing.hf_models import make_st_dir

    if not (folder / "modules.json").exists():
        with _quiet():
            make_st_dir(folder, head=("dense:16",))
    return f"hf:{folder}"


def _gguf(folder: Path) -> str:
    from deepsqueeze.testing.gguf_models import make_gguf

    file = folder / "model.gguf"
    if not file.exists():
        make_gguf(file)
    return f"gguf:{file}"


def _py_weights(factory: str) -> Callable[[Path], str]:
    def build(folder: Path) -> str:
        from safetensors.torch import save_file

        from deepsqueeze.resolve import resolve_model

        folder.mkdir(parents=True, exist_ok=True)
        module = resolve_model(factory, progress=False).module
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / "model.safetensors")
        return factory
    return build


_IMAGE_KINDS = {
    "cnn-bn": ("quant_models:TinyBNConvNet", "plain CNN: conv-BN-ReLU x2, pooling, Linear"),
    "cnn-residual": ("models:TinyResNet", "residual CNN with BatchNorm (two stages of residual blocks)"),
    "cnn-depthwise": ("models:DepthwiseSeparableCNN", "depthwise + pointwise CNN with BatchNorm and a concat"),
    "mlp": ("models:PlainMLP", "MLP 64-48-32-10"),
}
_OTHER_PY_KINDS = {
    "convtranspose": ("user_models:ConvTransposeDecoder", "ConvTranspose2d decoder (image output)"),
    "dict-output": ("user_models:DictDetector", "CNN whose forward returns a dict"),
    "tuple-output": ("user_models:TupleDetector", "CNN whose forward returns a tuple"),
    "recurrent": ("user_models:RecurrentTagger", "Conv1d + LSTM + GRU tagger"),
    "mha": ("user_models:MHAEncoder", "nn.MultiheadAttention encoder"),
}


def _kinds() -> dict[str, Kind]:
    from deepsqueeze.testing.hf_models import FAMILIES, REFUSED_FAMILIES

    kinds: dict[str, Kind] = {}
    for name, (factory, text) in _IMAGE_KINDS.items():
        kinds[name] = Kind(name, text, "digits", model=_py(factory), code=_py(factory))
    for name, (factory, text) in _OTHER_PY_KINDS.items():
        kinds[name] = Kind(name, text, None, model=_py(factory), code=_py(factory))
    kinds["py-weights"] = Kind("py-weights", "py: MLP with a --weights safetensors file", "digits",
                               build=_py_weights(_py("models:PlainMLP")), code=_py("models:PlainMLP"), weights=True)
    for family, (model_cls, *_rest) in FAMILIES.items():
        kinds[f"hf-{family}"] = Kind(f"hf-{family}", f"hf: {model_cls} (tiny, random weights)", TEXT,
                                     build=_hf(family))
    for family, (model_cls, *_rest) in REFUSED_FAMILIES.items():
        kinds[f"hf-{family}"] = Kind(f"hf-{family}", f"hf: {model_cls} (a family deepsqueeze refuses)", TEXT,
                                     build=_hf(family))
    kinds["st-dense"] = Kind("st-dense", "sentence-transformers folder: BERT, mean pooling, Dense 32->16",
                             TEXT, build=_st_dense)
    kinds["gguf-llama"] = Kind("gguf-llama", "gguf: a llama.cpp GGUF file (Llama, GQA, tied head; tiny, random)", TEXT,
                               build=_gguf)
    kinds["zoo"] = Kind("zoo", "packaged model: LeNet-300-100 (zoo:lenet300, trained on digits on first use)",
                        "digits", model="zoo:lenet300@digits")
    return kinds


KINDS: dict[str, Kind] = _kinds()

# command -> what it runs on: "recipe" (the kind's model options and a recipe), "artifact" (compress's
# output), "model" (the kind's model, once per kind: these take no recipe). ``recipes``, ``bench``, ``demo``
# and ``train`` take neither a recipe nor a user's model; the suite checks this table against the CLI's
# registered commands.
COMMANDS: dict[str, str] = {
    "plan": "recipe", "compress": "recipe", "search": "recipe", "inspect": "artifact", "evaluate": "artifact",
    "export-onnx": "artifact", "export-hf": "artifact", "export-pte": "artifact", "report": "artifact",
    "load": "artifact",
    "generate": "artifact", "inspect-model": "model", "sensitivity": "model",
}
NOT_MODEL_COMMANDS = ("recipes", "bench", "demo", "train")


def recipes() -> list[str]:
    """The shipped recipe names, sorted."""
    from deepsqueeze.recipes.schema import shipped_recipes

    return sorted(shipped_recipes())


@dataclass
class Cell:
    """One command on one recipe and one model kind: ``outcome`` is works / works, over budget / refused /
    failed; ``message`` the refusal's line or what failed."""

    command: str
    recipe: str
    kind: str
    outcome: str
    code: int | str
    seconds: float
    message: str = ""
    extra: dict[str, object] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet() -> Iterable[None]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def cli(argv: list[str]) -> tuple[int | str, str, str, float]:
    """``deepsqueeze *argv`` in this process: (exit code, stdout, stderr, seconds). An exception escaping
    the CLI's own boundary is returned as the code ``"exception: TYPE: TEXT"``."""
    import warnings

    from deepsqueeze.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")  # as the console script runs (a test runner may make warnings errors)
        try:
            main(argv)
            code: int | str = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # noqa: BLE001 - a cell records whatever escaped (Ctrl-C / SIGTERM stop the run)
            code = f"exception: {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def _judge(command: str, recipe: str, kind: str, result: tuple[int | str, str, str, float],
           allow_refusal: bool = True) -> Cell:
    code, _out, err, seconds = result
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if isinstance(code, str) or "Traceback" in err:
        return Cell(command, recipe, kind, FAILED, code, seconds, _last(lines) or str(code))
    unmeasured = [line for line in lines if "could not be measured" in line]
    if code in (0, EXIT_OVER_BUDGET) and unmeasured:
        return Cell(command, recipe, kind, FAILED, code, seconds, unmeasured[0])
    if code == 0:
        return Cell(command, recipe, kind, WORKS, code, seconds)
    if code == EXIT_OVER_BUDGET and command in ("compress", "search"):
        return Cell(command, recipe, kind, OVER_BUDGET, code, seconds, _last(errors or lines))
    if code == 2 and len(errors) == 1 and allow_refusal:
        return Cell(command, recipe, kind, REFUSED, code, seconds, errors[0])
    why = "refused after plan accepted the cell: " if code == 2 and len(errors) == 1 else ""
    return Cell(command, recipe, kind, FAILED, code, seconds, why + (_last(lines) or f"exit {code}"))


def _last(lines: list[str]) -> str:
    return lines[-1][:300] if lines else ""


def plan_cell(recipe: str, kind: Kind, folder: Path) -> Cell:
    """``plan --recipe RECIPE`` with the kind's model options."""
    return _judge("plan", recipe, kind.name, cli(["plan", "--recipe", recipe, *kind.args(folder), "--json"]))


def _example(model: object) -> object:
    import torch

    task = getattr(model, "task", None)
    if task is not None and task.is_text:
        return ["a small example sentence.", "another one, a little longer than the first."]
    return torch.randn(2, *model.input_shape)  # type: ignore[attr-defined]


def _load_and_call(artifact: Path, kind: Kind) -> tuple[int | str, str, str, float]:
    import torch

    import deepsqueeze

    start = time.perf_counter()
    try:
        model = deepsqueeze.load(artifact, model=kind.code)
        with torch.no_grad():
            out = model(_example(model))
        if not _finite(out):
            return "exception: the loaded model's output is not finite", "", "", time.perf_counter() - start
        return 0, "", "", time.perf_counter() - start
    except deepsqueeze.DeepsqueezeError as exc:
        return 2, "", f"error: {exc}", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded as a failed cell
        return f"exception: {type(exc).__name__}: {exc}", "", "", time.perf_counter() - start


def _finite(out: object) -> bool:
    import torch

    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all())
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    if isinstance(out, list | tuple):
        return all(_finite(v) for v in out)
    return hasattr(out, "keys") and all(_finite(out[k]) for k in out.keys())  # type: ignore[index]


def run_cell(recipe: str, kind: Kind, folder: Path, commands: Iterable[str] = tuple(COMMANDS),
             search: bool = True, pte: bool = True) -> list[Cell]:
    """Plan, then compress, then every artifact command in ``commands`` on the artifact (``export-pte`` only with
    ``pte``), and ``search`` (one trial of the recipe as a space without holes) on the model."""
    from deepsqueeze.recipes.schema import find_recipe

    commands = list(commands)
    args = kind.args(folder)
    work = folder / "cells" / f"{kind.name}--{recipe}"
    work.mkdir(parents=True, exist_ok=True)
    planned = _judge("plan", recipe, kind.name, cli(["plan", "--recipe", recipe, *args, "--json"]))
    cells = [planned]
    if "compress" not in commands:
        return cells
    artifact = work / "model.dsq"
    compressed = _judge("compress", recipe, kind.name,
                        cli(["compress", "--recipe", recipe, *args, "--out", str(artifact)]),
                        allow_refusal=planned.outcome == REFUSED)
    if planned.outcome == WORKS and compressed.outcome == REFUSED:
        compressed.outcome = FAILED
    cells.append(compressed)
    if compressed.outcome not in (WORKS, OVER_BUDGET):
        return cells
    if not artifact.is_file():
        compressed.outcome, compressed.message = FAILED, "compress exited without writing the artifact"
        return cells
    code = ["--model-code", kind.code] if kind.code else []
    data = ["--data", kind.data_ref(folder)] if kind.data else []
    artifact_commands: dict[str, Callable[[], tuple[int | str, str, str, float]]] = {
        "inspect": lambda: cli(["inspect", str(artifact), *code]),
        "evaluate": lambda: cli(["evaluate", str(artifact), *data, *code, "--no-latency"]),
        "export-onnx": lambda: cli(["export", str(artifact), "--format", "onnx", "--out", str(work / "m.onnx"),
                                    "--force", *code]),
        "export-hf": lambda: cli(["export", str(artifact), "--format", "hf", "--out", str(work / "hf"), "--force",
                                  *code]),
        "export-pte": lambda: cli(["export", str(artifact), "--format", "pte", "--out", str(work / "m.pte"),
                                   "--force", *code]),
        "report": lambda: cli(["report", str(artifact), "--out", str(work / "report.html"), *code]),
        "load": lambda: _load_and_call(artifact, kind),
        "generate": lambda: cli(["generate", str(artifact), "--prompt", "The cat sat", "--max-new-tokens", "4",
                                 *code]),
        "search": lambda: cli(["search", "--space", str(find_recipe(recipe)), *args, "--trials", "1",
                               "--out", str(work / "search")]),
    }
    for command in commands:
        if (command == "search" and not search) or (command == "export-pte" and not pte):
            continue
        if command in artifact_commands:
            cells.append(_judge(command, recipe, kind.name, artifact_commands[command]()))
    return cells


def model_cells(kind: Kind, folder: Path) -> list[Cell]:
    """The recipe-independent commands on the kind's model: ``inspect MODEL`` and ``sensitivity MODEL``."""
    args = kind.args(folder)
    ref, rest = args[1], args[2:]
    weights = rest[:2] if kind.weights else []
    return [_judge("inspect-model", "-", kind.name, cli(["inspect", ref, *weights])),
            _judge("sensitivity", "-", kind.name, cli(["sensitivity", ref, *rest, "--sparsities", "0.5",
                                                       "--limit", "16"]))]


def covering_subset(kinds: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """A fixed (recipe, kind) list holding every recipe and every kind at least once: recipes in order, each
    paired with the next kind (round robin) its plan accepts, from :data:`PAIRS` where it names one."""
    names = sorted(kinds or KINDS)
    pairs: list[tuple[str, str]] = []
    for index, recipe in enumerate(recipes()):
        pairs.append((recipe, PAIRS.get(recipe, names[index % len(names)])))
    used = {kind for _recipe, kind in pairs}
    pairs += [(KIND_RECIPE.get(kind, "int8-dynamic"), kind) for kind in names if kind not in used]
    return pairs + [pair for pair in ALSO if pair not in pairs]


# Pairings that exercise a recipe on the kind it is written for (a recipe missing here pairs round robin).
PAIRS = {
    "distill-3layer": "hf-bert", "prune-transformer": "hf-distilbert", "qat-w4-minilm": "st-dense",
    "deep-compression-lenet300": "zoo", "deep-compression-lenet5": "cnn-bn", "distill-lenet300": "mlp",
    "prune-structured": "cnn-residual", "prune-agp": "py-weights", "deep-compression": "cnn-depthwise",
    "int8-static": "cnn-residual", "lowrank-tucker": "cnn-depthwise", "w4-gptq": "hf-llama",
    "int8-smoothquant": "hf-gpt2", "mixed-precision": "mlp", "w3-lora": "hf-bert-classifier",
    "lowrank-svd": "hf-albert", "w4-rtn": "hf-qwen2", "finetune": "dict-output", "int8-dynamic": "hf-roberta",
    "llm-w4-gptq": "gguf-llama", "llm-w3-awq": "hf-llama", "llm-mixed-3.5bpw": "hf-qwen2",
    "llm-sparsegpt-2of4": "hf-llama", "llm-sparsegpt-2of4-w4": "gguf-llama", "llm-wanda-50": "hf-gpt2",
    "llm-gguf-q4_0": "gguf-llama", "llm-gguf-q4_k_m": "hf-llama", "llm-drop-blocks": "hf-qwen2",
}
KIND_RECIPE = {"gguf-llama": "w4-gptq", "mha": "w4-rtn", "convtranspose": "int8-dynamic", "tuple-output": "finetune", "recurrent": "w4-rtn"}
# The subset's cells that also run ``search`` (one per task: classifier, causal LM, sequence classifier).
SEARCHED = {("prune-structured", "cnn-residual"), ("w4-rtn", "hf-qwen2"), ("w3-lora", "hf-bert-classifier")}
# The subset's cells that also export an ExecuTorch program (a static int8 CNN, weight-only codes on a
# classifier, a causal LM's refusal); lowering takes seconds per model, so the full matrix runs the rest.
PTE_CELLS = {("int8-static", "cnn-residual"), ("mixed-precision", "mlp"), ("w4-rtn", "hf-qwen2")}
# The kinds the subset runs the recipe-independent commands on (one per task).
MODEL_CELLS = {"cnn-residual", "py-weights", "dict-output", "hf-bert", "hf-bert-classifier", "hf-gpt2", "st-dense"}
# Cells a user found broken once (issue 24 finding 5: prune-transformer on decoders and classifiers).
ALSO = [("prune-transformer", "hf-gpt2"), ("prune-transformer", "hf-bert-classifier")]


def run_matrix(folder: Path, pairs: Iterable[tuple[str, str]] | None = None, full: bool = False,
               log: Callable[[str], None] | None = None, kinds: Iterable[str] | None = None) -> list[Cell]:
    """Plan every (recipe, kind) cell; run the whole pipeline on ``pairs`` (every cell when ``full``);
    ``kinds``: only these kinds (default: all)."""
    pairs = set(pairs or ())
    cells: list[Cell] = []
    for kind in [KINDS[name] for name in (kinds or KINDS)]:
        for recipe in ["-", *recipes()]:
            if recipe == "-":
                got = model_cells(kind, folder) if full or kind.name in MODEL_CELLS else []
            elif full or (recipe, kind.name) in pairs:
                got = run_cell(recipe, kind, folder, search=full or (recipe, kind.name) in SEARCHED,
                               pte=full or (recipe, kind.name) in PTE_CELLS)
            else:
                got = [plan_cell(recipe, kind, folder)]
            cells += got
            if log is not None:
                for cell in got:
                    log(f"{cell.kind:18} {cell.recipe:26} {cell.command:12} {cell.outcome:18} {cell.seconds:6.1f}s "
                        f"{cell.message[:160]}")
    return cells


def counts(cells: Iterable[Cell]) -> dict[str, int]:
    """Cells per outcome."""
    got = Counter(cell.outcome for cell in cells)
    return {outcome: got.get(outcome, 0) for outcome in (WORKS, OVER_BUDGET, REFUSED, FAILED)}


_MARK = {WORKS: "✓", OVER_BUDGET: "✓ₒ", REFUSED: "–", FAILED: "✗"}


def matrix_markdown(cells: list[Cell], full: bool = False) -> str:
    """COVERAGE.md: the per-outcome counts, one table of recipes x kinds (compress where it ran, else plan),
    and every refusal and failure with its line."""
    by_cell: dict[tuple[str, str], str] = {}
    for cell in cells:
        if cell.command in ("plan", "compress"):
            by_cell[cell.recipe, cell.kind] = _MARK[cell.outcome] + ("" if cell.command == "compress" else "ᵖ")
    kinds = list(KINDS)
    lines = ["# Conformance matrix", "",
             "Generated by `python -m deepsqueeze.testing.conformance" + (" --full`" if full else "`") + "; do not "
             "edit. " + ("Every cell ran end to end." if full else "Every cell was planned; the covering subset ran "
                         "end to end (what `make test` runs; `make conformance` runs every cell)."),
             "Every command x shipped recipe x model kind of `deepsqueeze.testing`, on tiny random-weight models.",
             "✓ works end to end (artifact written, reloaded, run, quality measured; ✓ₒ: over the recipe's "
             "quality budget, exit 3), – refused by plan and compress before any work (one line, exit 2), "
             "✗ failed; ᵖ: plan only.", "",
             "| outcome | cells |", "|---|---|"]
    lines += [f"| {outcome} | {n} |" for outcome, n in counts(cells).items()]
    lines += ["", "| recipe | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for recipe in recipes():
        lines.append(f"| {recipe} | " + " | ".join(by_cell.get((recipe, k), "") for k in kinds) + " |")
    lines += ["", "## Model kinds", ""] + [f"- `{k.name}`: {k.description}" for k in KINDS.values()]
    lines += ["", "## Refusals and failures", ""]
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        if cell.outcome in (REFUSED, FAILED) and (cell.command, cell.message) not in seen:
            seen.add((cell.command, cell.message))
            lines.append(f"- {cell.outcome}, `{cell.command}` (e.g. {cell.recipe} on {cell.kind}): "
                         f"{cell.message.replace('|', '/')}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m deepsqueeze.testing.conformance [--full] [--out COVERAGE.md] [--json FILE] [--work DIR]``."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the whole pipeline on every cell")
    parser.add_argument("--out", default=None, help="write the markdown table here (COVERAGE.md)")
    parser.add_argument("--json", default=None, help="write every cell as JSON here")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--kinds", default=None, help="comma-separated model kinds (default: all)")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(ns.work or tmp)
        cells = run_matrix(folder, covering_subset(), full=ns.full, log=lambda s: print(s, flush=True),
                           kinds=ns.kinds.split(",") if ns.kinds else None)
    if ns.out:
        Path(ns.out).write_text(matrix_markdown(cells, ns.full), encoding="utf-8")
    if ns.json:
        Path(ns.json).write_text(json.dumps([asdict(c) for c in cells], indent=1), encoding="utf-8")
    print(json.dumps(counts(cells)))
    return 1 if counts(cells)[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())

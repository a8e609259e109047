"""The quality budget on users' CNNs: the shipped pruning and Deep Compression recipes on the residual and
depthwise CNNs of ``deepsqueeze.testing`` trained on Fashion-MNIST, as written (one global ranking) and as
``compress`` adapts them over budget (a sensitivity scan), beside Torch-Pruning on the residual CNN."""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "quality-budget"
TITLE = "Quality budget: pruning and Deep Compression recipes on a residual and a depthwise CNN, within 1 pp"
SETUP = (
    "py:deepsqueeze.testing.models:TinyResNet (BN stem, four residual blocks, GAP, fc) and DepthwiseSeparableCNN "
    "(depthwise + pointwise blocks with BN, a concat branch, fc), trained here on Fashion-MNIST (AdamW lr 3e-3, "
    "cosine, batch 128, the epochs listed, seed 0) and given to `compress` as the user's own model "
    "(`--model py:... --weights W.safetensors --data fashion-mnist`), each shipped recipe as written. `compress` "
    "measures top-1 accuracy on the 10k test split against the uncompressed model (default budget 1 pp); over "
    "budget, it runs the recipe again with the pruning stages' per-layer sparsities (unstructured) or per-group "
    "channel ratios (structured) allocated from a sensitivity scan at the same overall target, and writes the "
    "better result (`attempts`: the drop of each run; `exit`: 0 within budget, 3 over). The written .dsq is "
    "reloaded and evaluated; `ratio` = fp32 bytes / .dsq bytes; `speedup_b256` = fp32 / reloaded model at batch "
    "256 (median of interleaved rounds, 2 threads). Peer: Torch-Pruning BasePruner with "
    "GroupMagnitudeImportance(p=2), pruning_ratio 0.5 (the classifier ignored), fine-tuned with prune-structured's "
    "own budget (same epochs, AdamW, cosine)."
)
MODELS = {"cnn-residual": "TinyResNet", "cnn-depthwise": "DepthwiseSeparableCNN"}
RECIPES = ("deep-compression", "prune-structured", "prune-agp")
BASE_EPOCHS = 4
#: (model, recipe) cells not run (QUALITY_BUDGET_SKIP="model:recipe,..."): kept from the stored result if any
SKIP = {tuple(c.split(":", 1)) for c in os.environ.get("QUALITY_BUDGET_SKIP", "").split(",") if ":" in c}
TARGET_RATIO = 10.0  # deep-compression: file size
TARGET_SPEEDUP = 1.5  # prune-structured: batch 256


def _train_base(factory: str, data: Any, epochs: float, limit: int | None) -> Path:
    """Weights of ``factory`` trained on ``data``, cached per (factory, epochs) beside the zoo's."""
    from safetensors.torch import save_file

    from deepsqueeze.testing import models
    from deepsqueeze.train.loop import seed_everything, train_classifier
    from deepsqueeze.zoo.pretrained import cache_dir

    path = cache_dir() / "bench" / f"{factory}@{data.name}-{epochs}ep{'-quick' if limit else ''}.safetensors"
    if path.is_file():
        return path
    seed_everything(0)
    module = getattr(models, factory)()
    train_classifier(module, data, epochs=epochs, lr=3e-3, batch_size=128, optimizer="adamw", schedule="cosine",
                     seed=0, progress=False, limit=limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _torch_pruning(module: Any, example: Any) -> Any:
    import torch_pruning as tp
    from torch import nn

    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.BasePruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=0.5, ignored_layers=[last]).step()
    return module


def _latency_b256(ctx: BenchContext, base: Any, others: dict[str, Any], x: Any) -> dict[str, float]:
    from deepsqueeze.eval import measure_latency_interleaved

    fns = {"fp32": lambda: base(x), **{k: (lambda m=m: m(x)) for k, m in others.items()}}
    return measure_latency_interleaved(fns, warmup=3, repeat=5 if ctx.quick else 15, threads=ctx.threads)


def _bench_model(ctx: BenchContext, kind: str, factory: str, data_ref: str, recipes: tuple[str, ...],
                 epochs: float, limit: int | None) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    from deepsqueeze.artifact import load
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.testing import models
    from deepsqueeze.train.loop import train_classifier

    data = resolve_data(data_ref)
    ref = f"py:deepsqueeze.testing.models:{factory}"
    weights = _train_base(factory, data, epochs, limit)
    base = getattr(models, factory)()
    base.load_state_dict(load_file(str(weights)))
    base.eval()
    fp32_acc = accuracy(base, data)
    ctx.log(f"{kind}: fp32 accuracy {fp32_acc:.4f}")
    x = data.test_x[:256]
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name in recipes:
        recipe = load_recipe(name)
        out = tmp / f"{kind}-{name}.dsq"
        start = time.perf_counter()
        result = compress(ref, recipe, out, data_ref, weights=str(weights), progress=False)
        wall = time.perf_counter() - start
        loaded = load(out, model=ref).module.eval()
        acc = accuracy(loaded, data)
        budget = result.budget
        assert budget is not None, result.budget_note
        if abs(acc - budget.value) > 1e-9:
            raise AssertionError(f"{kind} {name}: the reloaded artifact scores {acc}, compress measured {budget.value}")
        row = {"model": kind, "recipe": name, "fp32_accuracy": round(fp32_acc, 4), "accuracy": round(acc, 4),
               "attempts": "; ".join(f"{a['recipe']}: {a['drop']:.2f} pp" for a in result.attempts),
               "written": result.adapted or "as written", "drop_pp": round(budget.drop, 2),
               "budget_pp": budget.max_drop, "exit": 0 if budget.within else 3,
               "artifact_bytes": result.artifact_bytes, "ratio": round(result.compression_ratio, 2),
               "compress_s": round(wall, 1)}
        if name == "prune-structured":
            times = _latency_b256(ctx, base, {"ours": loaded}, x)
            row["speedup_b256"] = round(times["fp32"] / times["ours"], 2)
        met = budget.within and (name != "deep-compression" or row["ratio"] >= TARGET_RATIO) and \
            (name != "prune-structured" or row["speedup_b256"] >= TARGET_SPEEDUP)
        row["target"] = (f"within {budget.max_drop:g} pp" + (f", ratio >= {TARGET_RATIO:g}x" if name ==
                         "deep-compression" else "") + (f", >= {TARGET_SPEEDUP}x b256" if name ==
                         "prune-structured" else ""))
        row["met"] = "yes" if met else "no"
        ctx.log(f"{kind} {name}: {row['attempts']} -> {acc:.4f} ({row['ratio']}x)")
        rows.append(row)
    if kind == "cnn-residual":
        stage = load_recipe("prune-structured").stages[0]
        peer = copy.deepcopy(base)
        start = time.perf_counter()
        _torch_pruning(peer, torch.zeros(1, *data.input_shape))
        train_classifier(peer, data, epochs=stage.epochs if limit is None else 0.2, lr=stage.lr, batch_size=128,
                         optimizer="adamw", schedule="cosine", seed=0, progress=False, limit=limit)
        wall = time.perf_counter() - start
        peer.eval()
        acc = accuracy(peer, data)
        times = _latency_b256(ctx, base, {"peer": peer}, x)
        rows.append({"model": kind, "recipe": "Torch-Pruning 0.5 + the same fine-tuning", "fp32_accuracy":
                     round(fp32_acc, 4), "accuracy": round(acc, 4), "drop_pp": round(100 * (fp32_acc - acc), 2),
                     "artifact_bytes": None, "compress_s": round(wall, 1),
                     "speedup_b256": round(times["fp32"] / times["peer"], 2)})
    return rows


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    """Every recipe on every model but the cells of ``SKIP``, whose rows are kept from the stored result (each
    names its run)."""
    if ctx.quick:
        return _bench_model(ctx, "cnn-depthwise", MODELS["cnn-depthwise"], "digits", ("prune-structured",), 2, None)
    ctx.notes.append(f"base models trained {BASE_EPOCHS} epochs on the Fashion-MNIST training split")
    rows = []
    for kind, factory in MODELS.items():
        ran = tuple(r for r in RECIPES if (kind, r) not in SKIP)
        rows += _bench_model(ctx, kind, factory, "fashion-mnist", ran, BASE_EPOCHS, None)
    from benchmarks.runner import kept_rows

    done = {(r["model"], r["recipe"]) for r in rows}
    return kept_rows(ctx, NAME, lambda r: (r["model"], r["recipe"]) not in done,
                     lambda kept: sorted({f"{r['model']} {r['recipe']}" for r in kept})) + rows

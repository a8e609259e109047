"""Coverage: how much of each model family every shipped quantization recipe actually compresses."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "coverage"
TITLE = "Coverage: share of weights each shipped quantization recipe compresses, per model family"
SETUP = (
    "Tiny random-weight models built inside the benchmark (no training): GPT-2 LM (2 layers, width 64, vocab "
    "1000, lm_head tied to wte; transformers Conv1D projections), a 3-layer BERT encoder (width 32), Conv1d + "
    "LSTM + GRU + Linear tagger, nn.MultiheadAttention encoder, ConvTranspose2d decoder, a conv detector "
    "returning a dict, and the untrained zoo CNN/MLPs (lenet300, lenet5, vgg-small). Each shipped recipe "
    "file is loaded and its quantize stages applied with `quantize_` (the call `compress` makes) with "
    "on_unsupported: skip; calibrating methods get 4 random batches of the model's input shape (random "
    "models have no data; figures here are about coverage, not quality). `linear_pct`: share of the "
    "weight elements of Linear-like layers (nn.Linear, transformers Conv1D) compressed; `weights_pct`: share "
    "of all weight elements of weight-bearing layers (embeddings, convs, RNNs, attention included; a tied "
    "weight counted once). `params`: unique parameters of the float model; `params_after`: the logical count "
    "after the recipe (larger when a tie was not kept: the two uses then hold two tables). `artifact_bytes`: the "
    ".dsq file; `ideal_bytes` (labelled ideal): bits x compressed "
    "weights + 32 bits x every other parameter, no scales or header. `reload_ok`: the .dsq loads back and "
    "gives the in-memory outputs (max abs difference <= 1e-4 x output scale). `fp32` rows: the unmodified "
    "model written as a .dsq against 4 bytes x unique parameters."
)
RECIPES = ("int8-dynamic", "int8-static", "int8-smoothquant", "w4-rtn", "w4-gptq", "mixed-precision")
LINEAR_KINDS = ("linear", "hf-conv1d")


def _families() -> dict[str, tuple[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return {
        "gpt2-tied": ("py:deepsqueeze.testing.user_models:gpt2_lm", lambda: torch.randint(0, 1000, (4, 16), generator=g)),
        "bert": ("py:deepsqueeze.testing.models:TinyBertEncoder", lambda: torch.randint(0, 50, (4, 12), generator=g)),
        "conv1d-lstm-gru": ("py:deepsqueeze.testing.user_models:RecurrentTagger",
                            lambda: torch.randn(4, 8, 24, generator=g)),
        "mha": ("py:deepsqueeze.testing.user_models:MHAEncoder", lambda: torch.randn(4, 10, 12, generator=g)),
        "convtranspose": ("py:deepsqueeze.testing.user_models:ConvTransposeDecoder",
                          lambda: torch.randn(4, 16, generator=g)),
        "dict-detector": ("py:deepsqueeze.testing.user_models:DictDetector",
                          lambda: torch.randn(4, 1, 8, 8, generator=g)),
        "lenet300": ("zoo:lenet300", lambda: torch.randn(4, 1, 28, 28, generator=g)),
        "lenet5": ("zoo:lenet5", lambda: torch.randn(4, 1, 28, 28, generator=g)),
        "vgg-small": ("zoo:vgg-small", lambda: torch.randn(4, 1, 28, 28, generator=g)),
    }


def _bits_of(module: torch.nn.Module) -> int:
    bits = getattr(module, "bits", None)
    if bits is not None:
        return int(bits)
    specs = getattr(module, "specs", None)
    if specs:
        return int(next(iter(specs.values()))["bits"])
    return 8  # Int8Linear, Int8Conv2d, Int8Embedding


def _close(a: Any, b: Any) -> bool:
    from deepsqueeze.core.outputs import output_tensors

    ta, tb = output_tensors(a), output_tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and float((x - y).abs().max()) <= 1e-4 * max(1.0, float(x.abs().max()))
        for x, y in zip(ta, tb, strict=True))


def _row(family: str, ref: str, make_input: Any, recipe_name: str | None, tmp: Path) -> dict[str, Any]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.core.record import get_record
    from deepsqueeze.quant import quantize_
    from deepsqueeze.recipes import load_recipe
    from deepsqueeze.zoo.resolve import resolve_base_model

    model = resolve_base_model(ref, progress=False)
    x = make_input()
    batches = [make_input() for _ in range(4)]
    start = time.perf_counter()
    caught: list[str] = []
    if recipe_name is not None:
        recipe = load_recipe(recipe_name)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for stage in recipe.stages:
                if stage.stage_type == "quantize":
                    quantize_(model.module, stage, batches, on_unsupported="skip")
        caught = [str(w.message) for w in seen if "deepsqueeze" in type(w.message).__module__]
    compress_s = time.perf_counter() - start
    with torch.no_grad():
        out = model.module(x)
    path = tmp / f"{family}-{recipe_name or 'fp32'}.dsq"
    size = save(model, path)
    try:
        loaded = load(path)
        with torch.no_grad():
            reload_ok = _close(out, loaded.module(x))
    except Exception as exc:  # noqa: BLE001 - a failure to reload is the figure
        reload_ok, caught = False, [*caught, f"reload: {type(exc).__name__}: {exc}"]
    params = model.base_params  # unique parameters of the float model (a tied table once)
    row: dict[str, Any] = {"family": family, "recipe": recipe_name or "fp32", "params": params,
                           "params_after": count_params(model.module)}
    if recipe_name is None:
        unique = 4 * params
        row.update(artifact_bytes=size, ideal_bytes=unique, bytes_vs_ideal=round(size / unique, 4),
                   reload_ok="yes" if reload_ok else "no")
        if family == "gpt2-tied":
            row.update(target="fp32 .dsq within 1% of unique-weight bytes", met="yes" if size <= 1.01 * unique else "no")
        return row
    entries = get_record(model.module).coverage
    weights = sum(e.weights for e in entries)
    covered = sum(e.weights for e in entries if e.action == "compressed")
    linear = sum(e.weights for e in entries if e.kind in LINEAR_KINDS)
    linear_cov = sum(e.weights for e in entries if e.kind in LINEAR_KINDS and e.action == "compressed")
    bits = 0
    for e in entries:
        if e.action == "compressed" and e.weights:
            bits += _bits_of(model.module.get_submodule(e.module)) * e.weights
    ideal = (bits + 32 * (params - covered)) / 8
    linear_pct = round(100.0 * linear_cov / linear, 2) if linear else None
    row.update(
        weights=weights, weights_pct=round(100.0 * covered / weights, 2) if weights else None, linear_pct=linear_pct,
        left_float=", ".join(e.module for e in entries if e.action != "compressed" and e.weights)[:80] or None,
        artifact_bytes=size, ideal_bytes=round(ideal), bytes_vs_ideal=round(size / ideal, 3),
        reload_ok="yes" if reload_ok else "no", warnings=len(caught), compress_s=round(compress_s, 2),
        target="100% of Linear-like weights, reloads", met="yes" if linear_pct in (None, 100.0) and reload_ok else "no")
    return row


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    families = _families()
    recipes = RECIPES[:2] if ctx.quick else RECIPES
    with tempfile.TemporaryDirectory() as tmp:
        for family, (ref, make_input) in families.items():
            rows.append(_row(family, ref, make_input, None, Path(tmp)))
            for recipe in recipes:
                ctx.log(f"{family} x {recipe}")
                rows.append(_row(family, ref, make_input, recipe, Path(tmp)))
    return rows

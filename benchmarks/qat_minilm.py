"""Weight-only QAT of all-MiniLM-L6-v2 (4 and 3 bits, group 64) against GPTQ, where QAT starts, on two domains.

    deepsqueeze bench qat-minilm                                            # 4 and 3 bits, seeds 0,1,2
    QAT_MINILM_BITS=4 QAT_MINILM_SEEDS=0 QAT_MINILM_EPOCHS=1 deepsqueeze bench qat-minilm   # a reduced run

``QAT_MINILM_PEERS=0`` skips the Brevitas peer; ``QAT_MINILM_PEER_SEEDS`` gives it its own seeds (default: the same).
``QAT_MINILM_KEEP=1`` keeps the stored rows of the widths this run does not measure (4 bits in one run, 3 in
another); every row names the run (commit, date) that measured it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.runner import BenchContext

NAME = "qat-minilm"
TITLE = "MiniLM weight-only QAT (4 and 3 bits, group 64) vs GPTQ, on pydoc sentences and on licence text"
SETUP = (
    "all-MiniLM-L6-v2. `qat` rows run the shipped recipe `qat-w4-minilm` (its `bits` set to 3 for the 3-bit "
    "rows) through `compress`: the word-embedding table rounded to packed rows first (so training sees its "
    "error), then GPTQ codes and group parameters (asymmetric, one scale and zero point per 64 inputs, 256 "
    "`pydoc-sentences:calib` sentences) as the starting point, learned step sizes (LSQ) with the straight-through "
    "estimator, trained with dropout off to match the fp32 model (sentence-embedding cosine plus, at weight "
    "`distill`, every layer's token hidden states: the distill stage's TinyBERT loss) on the 1,209 "
    "`pydoc-sentences:calib` sentences plus `augment` variants of each, then converted to the same packed modules "
    "as `w4-gptq`. Every figure is measured on the model loaded back from its .dsq. `gptq` rows: the same "
    "stage's prepare + convert without training (where QAT starts). Fidelity against fp32 embeddings on two "
    "domains, neither trained on: the 579 `pydoc-sentences:eval` sentences (Python's documentation) and the 748 "
    "`license-sentences` (legal prose from Debian's /usr/share/common-licenses). Brevitas peer: the same Linear "
    "layers as QuantLinear with `bits`-bit per-output-channel weights (Brevitas' integer weight quantizers have no "
    "group-of-64 form), trained with the same loss, data, epochs, learning rate and seed through the same loop; "
    "fake-quant only, embedding table float (no file). Mean ± std over the seeds in `seeds`; `cosine_min` is "
    "the worst sentence over all seeds."
)
TARGETS = {4: 0.995, 3: 0.985}
DOMAINS = ("pydoc-sentences:eval", "license-sentences")


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.data import resolve_data
    from deepsqueeze.resolve import resolve_model

    bits_list = [int(b) for b in _env_list("QAT_MINILM_BITS", "4,3")]
    seeds = [int(s) for s in _env_list("QAT_MINILM_SEEDS", "0,1,2")]
    epochs = float(os.environ["QAT_MINILM_EPOCHS"]) if os.environ.get("QAT_MINILM_EPOCHS") else None
    peers = os.environ.get("QAT_MINILM_PEERS", "1") != "0"
    peer_seeds = [int(s) for s in _env_list("QAT_MINILM_PEER_SEEDS", ",".join(map(str, seeds)))]
    limit = None
    if ctx.quick:
        bits_list, seeds, epochs, limit, peers = [4], [0], 0.1, 64, False
    domains = {ref: resolve_data(ref).sentences for ref in DOMAINS}
    if ctx.quick:
        domains = {ref: s[:64] for ref, s in domains.items()}
    fp32 = resolve_model("minilm", progress=False).module.eval()
    with torch.no_grad():
        reference = {ref: fp32.encode(s) for ref, s in domains.items()}
    tmp = Path(tempfile.mkdtemp(prefix="qat-minilm-"))
    rows: list[dict[str, Any]] = [{"method": "fp32", "bits": 32, **_fidelity([fp32], domains, reference)}]
    from benchmarks.runner import run_label

    label = run_label()
    for bits in bits_list:
        recipe0 = _recipe(bits, 0, epochs, limit)
        qat = recipe0.stages[0].qat
        ctx.log(f"qat-minilm: {bits}-bit gptq (QAT init)")
        start = time.perf_counter()
        path = _gptq(recipe0, tmp / f"gptq{bits}.dsq")
        gptq = {"method": "gptq (QAT init, no training)", "bits": bits, "seeds": "-", "epochs": 0,
                **_fidelity([_load(path)], domains, reference), "artifact_mb": _mb(path.stat().st_size),
                "compress_s": round(time.perf_counter() - start, 1)}
        rows.append(gptq)
        modules, times = [], []
        for seed in seeds:
            ctx.log(f"qat-minilm: {bits}-bit qat seed {seed} ({qat.epochs} epochs)")
            from deepsqueeze.recipes import compress

            out = tmp / f"qat{bits}-{seed}.dsq"
            result = compress("minilm", _recipe(bits, seed, epochs, limit), out, progress=False,
                              evaluate_result=False)
            times.append(result.compress_s)
            modules.append(_load(out))
            ctx.log(f"qat-minilm: {bits}-bit qat seed {seed}: {_fidelity(modules[-1:], domains, reference)}")
        row = {"method": "qat (recipe qat-w4-minilm)", "bits": bits, "seeds": ",".join(map(str, seeds)),
               "epochs": qat.epochs, "lr": qat.lr, "distill": qat.distill, "augment": qat.augment,
               **_fidelity(modules, domains, reference),
               "artifact_mb": _mb(out.stat().st_size), "compress_s": round(statistics.fmean(times), 1)}
        key = "pydoc_cosine_mean"
        row["target"] = f"{key} >= {TARGETS.get(bits, 0)} and >= gptq on both domains"
        row["met"] = "yes" if row[key] >= TARGETS.get(bits, 0) and all(
            row[f"{d}_cosine_mean"] >= gptq[f"{d}_cosine_mean"] for d in ("pydoc", "license")) else "no"
        rows.append(row)
        if peers:
            rows.append(_brevitas(ctx, bits, peer_seeds, qat, domains, reference, row))
    for row in rows:
        row["run"] = label
    if os.environ.get("QAT_MINILM_KEEP", "0") != "0" and not ctx.quick:
        rows = [rows[0], *_kept_rows(ctx, bits_list), *rows[1:]]
    return rows


def _kept_rows(ctx: BenchContext, bits_list: list[int]) -> list[dict[str, Any]]:
    """Rows of the other widths from the stored result, each still naming the run that measured it."""
    from benchmarks.runner import kept_rows

    return kept_rows(ctx, NAME, lambda row: row.get("bits") not in (32, *bits_list),
                     lambda kept: [f"{b} bits" for b in sorted({row["bits"] for row in kept})])


def _recipe(bits: int, seed: int, epochs: float | None, limit: int | None) -> Any:
    from deepsqueeze.recipes import load_recipe, parse_recipe

    form = load_recipe("qat-w4-minilm").to_dict()
    form["seed"] = seed
    stage = form["stages"][0]
    stage["bits"] = bits
    if epochs is not None:
        stage["qat"]["epochs"] = epochs
    if limit is not None:
        stage["qat"]["limit"] = limit
        stage["calibration_samples"] = min(stage["calibration_samples"], limit)
    return parse_recipe(form, f"qat-w{bits}-minilm")


def _gptq(recipe: Any, path: Path) -> Path:
    """Prepare + convert of the recipe's stage without training: GPTQ's codes, QAT's starting point."""
    from deepsqueeze.artifact import save
    from deepsqueeze.core.calibrate import calibration_batches
    from deepsqueeze.data import resolve_data
    from deepsqueeze.quant import convert_qat_, prepare_qat_
    from deepsqueeze.resolve import resolve_model

    stage = recipe.stages[0]
    model = resolve_model("minilm", progress=False)
    batches = calibration_batches(model, resolve_data(recipe.data), samples=stage.calibration_samples)
    prepare_qat_(model.module, stage, batches)
    model.module.eval()
    convert_qat_(model.module, stage)
    save(model, path)
    return path


def _load(path: Path) -> nn.Module:
    from deepsqueeze.artifact import load

    return load(path).module.eval()


def _fidelity(modules: list[nn.Module], domains: dict[str, list[str]],
              reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per domain: cosine mean (mean ± std over ``modules``, one per seed) and the worst sentence of any."""
    from deepsqueeze.eval import embedding_fidelity

    out: dict[str, float] = {}
    for ref, sentences in domains.items():
        short = ref.split("-")[0]
        means, mins = [], []
        for module in modules:
            with torch.no_grad():
                stats = embedding_fidelity(module.encode(sentences), reference[ref])  # type: ignore[operator]
            means.append(float(stats["cosine_mean"]))
            mins.append(float(stats["cosine_min"]))
        out[f"{short}_cosine_mean"] = round(statistics.fmean(means), 4)
        out[f"{short}_cosine_std"] = round(statistics.stdev(means), 4) if len(means) > 1 else 0.0
        out[f"{short}_cosine_min"] = round(min(mins), 4)
    return out


def _brevitas(ctx: BenchContext, bits: int, seeds: list[int], qat: Any, domains: dict[str, list[str]],
              reference: dict[str, torch.Tensor], ours: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": "brevitas QAT (per-channel, peer)", "bits": bits,
                           "seeds": ",".join(map(str, seeds)), "epochs": qat.epochs, "lr": qat.lr}
    try:
        import brevitas.nn as qnn
    except Exception as exc:  # noqa: BLE001  (report why the peer could not run, keep the row)
        row["note"] = f"brevitas unavailable: {type(exc).__name__}: {exc}"
        return row
    import warnings

    from deepsqueeze.core.context import StageContext
    from deepsqueeze.data import resolve_data
    from deepsqueeze.distill import DistillConfig, distill_
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.train import finetune_model

    data = resolve_data("pydoc-sentences:calib")
    modules = []
    for seed in seeds:
        ctx.log(f"qat-minilm: {bits}-bit brevitas seed {seed}")
        model, teacher = resolve_model("minilm", progress=False), resolve_model("minilm", progress=False)
        for name, layer in [(n, m) for n, m in model.module.named_modules() if isinstance(m, nn.Linear)]:
            new = qnn.QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  weight_bit_width=bits)
            new.load_state_dict(layer.state_dict(), strict=False)
            parent, _, child = name.rpartition(".")
            setattr(model.module.get_submodule(parent) if parent else model.module, child, new)
        stage_ctx = StageContext(model=model, data=data, reference=teacher, device=torch.device("cpu"), seed=seed,
                                 progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if qat.distill > 0:  # the loss and data our recipe trains with
                config = DistillConfig(epochs=qat.epochs, lr=qat.lr, batch_size=qat.batch_size,
                                       optimizer=qat.optimizer, schedule=qat.schedule, limit=qat.limit,
                                       hidden_weight=qat.distill, augment=qat.augment)
                distill_(model, teacher.module, config, data, seed=seed, progress=False)
            else:
                finetune_model(model, stage_ctx, batch_size=qat.batch_size, limit=qat.limit, what="Brevitas QAT",
                               epochs=qat.epochs, lr=qat.lr, optimizer=qat.optimizer, schedule=qat.schedule,
                               dropout=False)
        modules.append(model.module.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row.update(_fidelity(modules, domains, reference))
    if ours["met"] == "yes" and ours["pydoc_cosine_mean"] < row["pydoc_cosine_mean"]:
        ours["met"] = "no (below brevitas)"
    return row


def _mb(n: float) -> float:
    return round(n / 1e6, 2)

"""Quantization-aware training on the Fashion-MNIST CNNs: QAT vs PTQ at the same bits, vs torch.ao and Brevitas.

The matrix is configurable (the full issue-13 run is 3 seeds x LeNet-5 and vgg-small)::

    QAT_BENCH_MODELS=lenet5,vgg-small QAT_BENCH_SEEDS=0,1,2 deepsqueeze bench qat-cnn
    python -m benchmarks.qat_cnn --models lenet5 --seeds 0 --configs w4a8,ternary --epochs 1   # no file written

``QAT_BENCH_EPOCHS`` overrides the recipes' epochs (the row then says so); ``QAT_BENCH_CONFIGS`` picks
among w8a8, w4a8, w2a8, ternary, binary; ``QAT_BENCH_PEERS=0`` skips the peers. ``QAT_BENCH_TRAIN_THREADS``
sets the torch threads of training and evaluation (default: the bench's ``--threads``; latency always runs
at ``--threads``). ``QAT_BENCH_KEEP=1`` keeps the rows of the models this run does not measure from the
stored ``benchmarks/results/qat-cnn.json`` (e.g. LeNet-5 with 3 seeds in one run, vgg-small with fewer in
another); every row names the run (commit, date) it was measured in.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.runner import BenchContext

NAME = "qat-cnn"
TITLE = "QAT on Fashion-MNIST CNNs: W8A8, W4A8, W2A8, ternary, binary vs PTQ at the same bits and peers"
SETUP = (
    "zoo:lenet5@fashion-mnist / zoo:vgg-small@fashion-mnist (the deterministic zoo models), full 10k test split. "
    "`qat` rows run the shipped recipes (`qat-w8a8`, `qat-w4a8`, `qat-w2a8`, `qat-ternary`, `qat-binary`) "
    "through `compress`, then load the .dsq and evaluate the loaded model (A8 rows execute as integers: "
    "Int8Conv2d / Int8Linear on x86 kernels; ternary / binary rows are weight-only packed modules, first and "
    "last layer 8-bit). `ptq` rows: the same stage's prepare + convert without training (MSE-best weight "
    "clipping, percentile-99.99 activation ranges on 512 training images, same bits and representation), i.e. "
    "where QAT starts. Peers at the same epochs, data, learning rate (the recipe's, column `lr`), Adam, cosine "
    "schedule and batch 128, plain cross-entropy (the recipes add distillation from fp32): torch.ao FX QAT (x86 qconfig, W8A8 only) and Brevitas "
    "(fake-quant QuantConv2d/QuantLinear with 8-bit QuantIdentity inputs; no integer execution). Accuracy as "
    "mean ± std over the seeds listed in `seeds`. Latency: batch 256, 2 threads, interleaved with fp32, median "
    "(p10-p90) of 9 on seed 0; the machine was shared, so latencies are noisy, sizes and accuracies are not. "
    "`train_samples`: training images seen per epoch (a run with QAT_BENCH_LIMIT trains on the first N of a "
    "seeded shuffle; the shipped recipes train on all 60k); `train_threads`: torch threads of training."
)

CONFIGS: dict[str, dict[str, Any]] = {
    "w8a8": {"recipe": "qat-w8a8", "target": 0.1, "peer_bits": 8},
    "w4a8": {"recipe": "qat-w4a8", "target": 0.3, "peer_bits": 4},
    "w2a8": {"recipe": "qat-w2a8", "target": 1.5, "peer_bits": 2},
    "ternary": {"recipe": "qat-ternary", "target": 1.5, "peer_bits": None},
    "binary": {"recipe": "qat-binary", "target": 3.0, "peer_bits": None},
}


def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    models = _env_list("QAT_BENCH_MODELS", "lenet5")
    seeds = [int(s) for s in _env_list("QAT_BENCH_SEEDS", "0")]
    configs = _env_list("QAT_BENCH_CONFIGS", ",".join(CONFIGS))
    epochs = float(os.environ["QAT_BENCH_EPOCHS"]) if os.environ.get("QAT_BENCH_EPOCHS") else None
    limit = int(os.environ["QAT_BENCH_LIMIT"]) if os.environ.get("QAT_BENCH_LIMIT") else None
    peers = os.environ.get("QAT_BENCH_PEERS", "1") != "0"
    train_threads = int(os.environ.get("QAT_BENCH_TRAIN_THREADS") or ctx.threads)
    if ctx.quick:
        models, seeds, configs, epochs, limit = ["lenet5"], [0], ["w4a8"], 0.05, 2048
    rows = matrix(ctx, models, seeds, configs, epochs, limit, peers, train_threads)
    torch.set_num_threads(ctx.threads)  # the run's header records the bench's threads, not the training ones
    if os.environ.get("QAT_BENCH_KEEP", "0") != "0" and not ctx.quick:
        rows = _kept_rows(ctx, models) + rows
    return rows


def _kept_rows(ctx: BenchContext, models: list[str]) -> list[dict[str, Any]]:
    """Rows of the other models from the stored result, each still naming the run that measured it."""
    from benchmarks.runner import kept_rows

    return kept_rows(ctx, NAME, lambda row: row.get("model") not in models,
                     lambda kept: sorted({row["model"] for row in kept}))


def matrix(ctx: BenchContext, models: list[str], seeds: list[int], configs: list[str], epochs: float | None,
           limit: int | None, peers: bool, train_threads: int | None = None) -> list[dict[str, Any]]:
    from deepsqueeze.data import resolve_data

    train_threads = train_threads or ctx.threads
    torch.set_num_threads(train_threads)
    data = resolve_data("fashion-mnist")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown QAT configs {unknown}: choose from {list(CONFIGS)}")
    rows: list[dict[str, Any]] = []
    from benchmarks.runner import run_label

    label = run_label()
    for model in models:
        rows += _model_rows(ctx, model, data, seeds, configs, epochs, limit, peers, train_threads)
    for row in rows:
        row["run"] = label
        row["train_threads"] = train_threads
    return rows


def _recipe(name: str, seed: int, epochs: float | None, limit: int | None) -> Any:
    from deepsqueeze.recipes import load_recipe, parse_recipe

    recipe = load_recipe(name)
    form = recipe.to_dict()
    form["seed"] = seed
    stage = form["stages"][0]
    if epochs is not None:
        stage["qat"]["epochs"] = epochs
        frozen = stage["qat"].get("freeze_bn_after")
        if frozen is not None:
            stage["qat"]["freeze_bn_after"] = min(frozen, max(epochs / 2, 0.0))
    if limit is not None:
        stage["qat"]["limit"] = limit
    return parse_recipe(form, name)


def _model_rows(ctx: BenchContext, name: str, data: Any, seeds: list[int], configs: list[str],
                epochs: float | None, limit: int | None, peers: bool, train_threads: int) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.calibrate import calibration_batches
    from deepsqueeze.eval import accuracy
    from deepsqueeze.quant import convert_qat_, prepare_qat_
    from deepsqueeze.recipes import compress
    from deepsqueeze.resolve import resolve_model

    ref = f"zoo:{name}@fashion-mnist"
    base = resolve_model(ref, progress=False)
    base_acc = accuracy(base.module, data) * 100
    tmp = Path(tempfile.mkdtemp(prefix="qat-cnn-"))
    fp32_bytes = save(base, tmp / "fp32.dsq")
    batch = data.test_x[:256]
    rows = [{"model": name, "config": "fp32", "method": "fp32", "accuracy": round(base_acc, 2), "accuracy_std": 0.0,
             "drop_pp": 0.0, "seeds": "-", "epochs": 0, "artifact_bytes": fp32_bytes}]
    runners: dict[str, Any] = {"fp32": lambda: base.module(batch)}
    for cname in configs:
        spec = CONFIGS[cname]
        recipe0 = _recipe(spec["recipe"], 0, epochs, limit)
        stage = recipe0.stages[0]
        ep = stage.qat.epochs
        # PTQ at the same bits and representation: prepare + convert, no training (deterministic: one run)
        ctx.log(f"qat-cnn: {name} {cname} ptq")
        ptq = resolve_model(ref, progress=False)
        start = time.perf_counter()
        batches = calibration_batches(ptq, data, samples=stage.calibration_samples) if stage.qat.act_bits else None
        prepare_qat_(ptq.module, stage, batches)
        ptq.module.eval()
        convert_qat_(ptq.module, stage)
        ptq_s = time.perf_counter() - start
        ptq_bytes = save(ptq, tmp / "ptq.dsq")
        ptq_acc = accuracy(load(tmp / "ptq.dsq").module, data) * 100
        rows.append({"model": name, "config": cname, "method": "ptq (QAT init, no training)",
                     "accuracy": round(ptq_acc, 2), "accuracy_std": 0.0, "drop_pp": round(base_acc - ptq_acc, 2),
                     "seeds": "-", "epochs": 0, "artifact_bytes": ptq_bytes, "compress_s": round(ptq_s, 1)})
        accs, qat_bytes, qat_s = [], 0, []
        for seed in seeds:
            ctx.log(f"qat-cnn: {name} {cname} qat seed {seed} ({ep} epochs)")
            recipe = _recipe(spec["recipe"], seed, epochs, limit)
            out = tmp / f"{cname}-{seed}.dsq"
            result = compress(ref, recipe, out, progress=False, evaluate_result=False)
            qat_s.append(result.compress_s)
            loaded = load(out)
            accs.append(accuracy(loaded.module, data) * 100)
            ctx.log(f"qat-cnn: {name} {cname} qat seed {seed}: {accs[-1]:.2f}% (fp32 {base_acc:.2f}%, ptq {ptq_acc:.2f}%)")
            qat_bytes = result.artifact_bytes
            if seed == seeds[0]:
                runners[f"{cname} qat"] = lambda m=loaded.module: m(batch)
        mean = statistics.fmean(accs)
        row = {"model": name, "config": cname, "method": f"qat (recipe {spec['recipe']})", "accuracy": round(mean, 2),
               "accuracy_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
               "drop_pp": round(base_acc - mean, 2), "seeds": ",".join(map(str, seeds)), "epochs": ep,
               "train_samples": limit or len(data.train_x), "lr": stage.qat.lr, "artifact_bytes": qat_bytes, "compress_s": round(statistics.fmean(qat_s), 1),
               "target": f"drop <= {spec['target']} pp and >= ptq",
               "met": "yes" if base_acc - mean <= spec["target"] and mean >= ptq_acc else "no"}
        rows.append(row)
        if peers and spec["peer_bits"] is not None:
            rows += _peer_rows(ctx, name, cname, base, data, seeds, ep, limit, spec["peer_bits"], base_acc, batch,
                               runners, row, stage.qat.lr)
    _latency(ctx, rows, runners, name)
    torch.set_num_threads(train_threads)
    return rows


def _train(module: nn.Module, data: Any, epochs: float, seed: int, limit: int | None, lr: float) -> None:
    from deepsqueeze.train import train_classifier

    train_classifier(module, data, epochs=epochs, lr=lr, batch_size=128, schedule="cosine", seed=seed,
                     progress=False, limit=limit)


def _peer_rows(ctx: BenchContext, name: str, cname: str, base: Any, data: Any, seeds: list[int], epochs: float,
               limit: int | None, bits: int, base_acc: float, batch: torch.Tensor, runners: dict[str, Any],
               ours: dict[str, Any], lr: float) -> list[dict[str, Any]]:
    from deepsqueeze.eval import accuracy

    out = []
    peers: dict[str, Any] = {"brevitas QAT": _brevitas}
    if bits == 8:
        peers["torch.ao FX QAT"] = _torch_ao
    for label, fn in peers.items():
        accs = []
        for seed in seeds:
            ctx.log(f"qat-cnn: {name} {cname} {label} seed {seed}")
            try:
                module = fn(copy.deepcopy(base.module), data, epochs, seed, limit, bits, batch, lr)
            except Exception as exc:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
                ctx.notes.append(f"{label} on {name} {cname}: did not run ({type(exc).__name__}: {exc})"[:300])
                module = None
            if module is None:
                break
            accs.append(accuracy(module, data) * 100)
            ctx.log(f"qat-cnn: {name} {cname} {label} seed {seed}: {accs[-1]:.2f}%")
            if seed == seeds[0] and label.startswith("torch.ao"):
                runners[f"{cname} {label}"] = lambda m=module: m(batch)
        if not accs:
            continue
        mean = statistics.fmean(accs)
        out.append({"model": name, "config": cname, "method": label, "accuracy": round(mean, 2),
                    "accuracy_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                    "drop_pp": round(base_acc - mean, 2), "seeds": ",".join(map(str, seeds[: len(accs)])),
                    "epochs": epochs, "train_samples": limit or len(data.train_x), "lr": lr})
        if ours["met"] == "yes" and ours["accuracy"] < mean:
            ours["met"] = f"no (below {label})"
    return out


def _torch_ao(module: nn.Module, data: Any, epochs: float, seed: int, limit: int | None, bits: int,
              batch: torch.Tensor, lr: float) -> nn.Module | None:
    import warnings

    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(module.train(), get_default_qat_qconfig_mapping("x86"), (batch[:1],))
        _train(prepared, data, epochs, seed, limit, lr)
        return convert_fx(prepared.eval())


def _brevitas(module: nn.Module, data: Any, epochs: float, seed: int, limit: int | None, bits: int,
              batch: torch.Tensor, lr: float) -> nn.Module | None:
    import warnings

    import brevitas.nn as qnn

    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for index, (lname, layer) in enumerate(layers):
        wbits = 8 if index in (0, len(layers) - 1) else bits  # first and last 8-bit, as ours
        if isinstance(layer, nn.Conv2d):
            new: nn.Module = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                             layer.padding, bias=layer.bias is not None, weight_bit_width=wbits)
        else:
            new = qnn.QuantLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  weight_bit_width=wbits)
        new.load_state_dict(layer.state_dict(), strict=False)
        wrapped = nn.Sequential(qnn.QuantIdentity(bit_width=8, return_quant_tensor=False), new)
        parent, _, child = lname.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, wrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.eval()
        with torch.no_grad():
            module(batch)  # initialise the activation statistics
        _train(module, data, epochs, seed, limit, lr)
    return module.eval()


def _latency(ctx: BenchContext, rows: list[dict[str, Any]], runners: dict[str, Any], model: str) -> None:
    from deepsqueeze.eval.latency import measure_latency_spread

    stats = measure_latency_spread(runners, warmup=3, repeat=9, threads=ctx.threads)
    fp32 = stats["fp32"].median
    for row in rows:
        key = "fp32" if row["method"] == "fp32" else (
            f"{row['config']} qat" if row["method"].startswith("qat") else f"{row['config']} {row['method']}")
        if key in stats:
            med, p10, p90 = stats[key].median, stats[key].p10, stats[key].p90
            row["latency_ms"] = round(med, 2)
            row["latency_p10_p90"] = f"{p10:.2f}-{p90:.2f}"
            row["speedup_vs_fp32"] = round(fp32 / med, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="lenet5")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--train-threads", type=int, default=None)
    args = parser.parse_args()
    ctx = BenchContext()
    rows = matrix(ctx, args.models.split(","), [int(s) for s in args.seeds.split(",")], args.configs.split(","),
                  args.epochs, args.limit, not args.no_peers, args.train_threads)
    for row in rows:
        print(row)
    for note in ctx.notes:
        print("note:", note)


if __name__ == "__main__":
    main()

"""Structured pruning: 50% of the channels of vgg-small (and LeNet-5) removed, fine-tuned, vs Torch-Pruning."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "prune-structured"
TITLE = "Structured pruning: 50% of the channels of vgg-small and LeNet-5 vs Torch-Pruning"
SETUP = (
    "zoo:vgg-small@fashion-mnist and zoo:lenet5@fashion-mnist (trained by the zoo). Ours: the shipped recipe "
    "recipes/prune-structured.yaml applied through `compress` (its seed set per run): `prune_channels` stage, "
    "ratio 0.5 in every dependency group (torch.fx graph: conv -> BatchNorm -> next conv, flatten -> fc), group "
    "L2 magnitude, the model physically rewritten; the .dsq reloaded and evaluated. Peer: Torch-Pruning "
    "BasePruner with GroupMagnitudeImportance(p=2), pruning_ratio 0.5, the classifier ignored, in the same run. "
    "Both fine-tuned with the same budget: AdamW lr 1e-3, cosine, batch 128, the epochs listed, seeds 0/1/2 "
    "(seed = fine-tuning order). Accuracy on the full 10k test split (mean and per seed); latency at batch 1 and "
    "256, interleaved with the fp32 model, 2 threads; `prune_s` is the time of the pruning step alone."
)
RECIPE = "prune-structured"
TARGET_DROP_PP = 0.5
TARGET_SPEEDUP_B256 = 2.0
TARGET_SPEEDUP_B1 = 1.8


def _torch_pruning(module: Any, example: Any) -> Any:
    import torch_pruning as tp
    from torch import nn

    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.BasePruner(module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return module


def _bench_model(name: str, data_ref: str, epochs: float, seeds: list[int], ctx: BenchContext,
                 limit: int | None) -> list[dict[str, Any]]:
    import torch

    from deepsqueeze.artifact import load
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy, measure_latency_interleaved
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.train.loop import train_classifier

    data = resolve_data(data_ref)
    base = resolve_model(f"zoo:{name}@{data_ref}", progress=False)
    fp32_acc = accuracy(base.module, data)
    example = torch.zeros(1, *base.input_shape)
    tmp = Path(tempfile.mkdtemp())
    ours_acc, peer_acc, first = [], [], {}
    recipe = load_recipe(RECIPE)
    if epochs != recipe.stages[0].epochs:  # --quick only: the published rows run the recipe as shipped
        recipe = recipe.model_copy(update={"stages": (recipe.stages[0].model_copy(update={"epochs": epochs}),
                                                      *recipe.stages[1:])})
    for seed in seeds:
        result = compress(f"zoo:{name}@{data_ref}", recipe.model_copy(update={"seed": seed}),
                          tmp / f"{name}-{seed}.dsq", data_ref, progress=False, evaluate_result=False)
        ours, size = result.model, result.artifact_bytes
        loaded = load(tmp / f"{name}-{seed}.dsq")
        acc = accuracy(loaded.module, data)
        if acc != accuracy(ours.module, data):
            raise AssertionError("the loaded artifact does not evaluate like the model that was saved")
        ours_acc.append(acc)

        peer = copy.deepcopy(base.module).eval()
        start = time.perf_counter()
        _torch_pruning(peer, example)
        peer_prune_s = time.perf_counter() - start
        train_classifier(peer, data, epochs=epochs, lr=1e-3, batch_size=128, optimizer="adamw", schedule="cosine",
                         seed=seed, progress=False, limit=limit)
        peer.eval()
        peer_acc.append(accuracy(peer, data))
        if not first:
            first = {"ours": loaded.module.eval(), "peer": peer, "size": size, "report": result.stage_reports[-1],
                     "peer_prune_s": peer_prune_s, "peer_params": count_params(peer)}
        ctx.log(f"{name} seed {seed}: ours {acc:.4f}, Torch-Pruning {peer_acc[-1]:.4f}")

    fp32_m, ours_m, peer_m = base.module.eval(), first["ours"], first["peer"]
    one, big = data.test_x[:1], data.test_x[:256]
    times = measure_latency_interleaved(
        {"fp32_b1": lambda: fp32_m(one), "ours_b1": lambda: ours_m(one), "peer_b1": lambda: peer_m(one),
         "fp32_b256": lambda: fp32_m(big), "ours_b256": lambda: ours_m(big), "peer_b256": lambda: peer_m(big)},
        warmup=3, repeat=5 if ctx.quick else 15, threads=ctx.threads)
    report = first["report"]

    def row(method: str, accs: list[float], params: int, key: str, prune_s: float) -> dict[str, Any]:
        mean = statistics.mean(accs)
        return {
            "model": f"zoo:{name}@{data_ref}", "method": method, "params": params, "fp32_params": base.base_params,
            "fp32_accuracy": round(fp32_acc, 4), "accuracy_mean": round(mean, 4),
            "accuracy_seeds": " ".join(f"{a:.4f}" for a in accs), "drop_pp": round(100 * (fp32_acc - mean), 2),
            "finetune_epochs": epochs, "prune_s": round(prune_s, 3),
            "latency_ms_b1": round(times[f"{key}_b1"], 3), "latency_ms_b256": round(times[f"{key}_b256"], 2),
            "speedup_b1": round(times["fp32_b1"] / times[f"{key}_b1"], 2),
            "speedup_b256": round(times["fp32_b256"] / times[f"{key}_b256"], 2),
        }

    ours_row = row("ours: prune_channels 0.5, group L2", ours_acc, report["params_after"], "ours",
                   report["prune_seconds"])
    ours_row["artifact_bytes"] = first["size"]
    peer_row = row("Torch-Pruning BasePruner + GroupMagnitudeImportance 0.5", peer_acc, first["peer_params"], "peer",
                   first["peer_prune_s"])
    met = (ours_row["speedup_b256"] >= TARGET_SPEEDUP_B256 and ours_row["speedup_b1"] >= TARGET_SPEEDUP_B1
           and ours_row["drop_pp"] <= TARGET_DROP_PP and ours_row["accuracy_mean"] >= peer_row["accuracy_mean"])
    ours_row.update(target=f"speedup >= {TARGET_SPEEDUP_B256}x b256 and >= {TARGET_SPEEDUP_B1}x b1, drop <= "
                           f"{TARGET_DROP_PP} pp, accuracy >= Torch-Pruning's", met="yes" if met else "no")
    return [ours_row, peer_row]


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    if ctx.quick:
        return _bench_model("vgg-small", "digits", 1, [0], ctx, None)
    from deepsqueeze.recipes import load_recipe

    epochs = load_recipe(RECIPE).stages[0].epochs  # the recipe's own fine-tuning budget, for both tools
    rows = _bench_model("vgg-small", "fashion-mnist", epochs, [0, 1, 2], ctx, None)
    rows += _bench_model("lenet5", "fashion-mnist", epochs, [0, 1, 2], ctx, None)
    return rows

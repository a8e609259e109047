"""AGP magnitude pruning of LeNet-300-100 to 92% sparsity vs torch.nn.utils.prune (global L1), same fine-tuning."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "prune-lenet300"
TITLE = "Pruning: LeNet-300-100 to 92% sparsity (AGP) vs torch.nn.utils.prune"
SETUP = (
    "zoo:lenet300@fashion-mnist (trained by the zoo). Ours: `prune` stage, L1 magnitude, per-layer targets "
    "93/90/70% (fc1/fc2/fc3, as Han et al. set by layer sensitivity: 92.6% of all weights), AGP cubic schedule "
    "from 0 over the first 60% of the fine-tuning steps, masks re-applied after every "
    "step; stored with the `sparse` encoding (values + bitmap/CSR indices); Linear layers at >= 85% sparsity "
    "load as SparseCSRLinear, which runs torch.sparse.mm or a dense product, whichever its first-call race "
    "measured faster for that shape and batch kind (`kernel_b1_b256`): by default (`--prefer memory`) the dense "
    "weight is rebuilt from CSR on each call where dense wins; the `--prefer speed` row is the same .dsq loaded "
    "again and run with a dense copy kept where that races faster. Peer: torch.nn.utils.prune.global_unstructured (L1Unstructured, "
    "the same overall sparsity) once, then the same fine-tuning (its masks stay on through the reparametrization), saved dense. "
    "Both: Adam lr 1e-3, cosine, batch 128, the epochs listed. Accuracy on the full 10k test split; latency "
    "at batch 1 and 256 interleaved with the fp32 model, 2 threads."
)
SPARSITY = 0.92
LAYER_SPARSITY = {"1": 0.93, "3": 0.90, "5": 0.70}
TARGET_DROP_PP = 0.3


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from torch import nn
    from torch.nn.utils import prune as torch_prune

    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.core.counting import count_nonzero_params
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy, measure_latency_interleaved
    from deepsqueeze.prune import PruneConfig, SparseCSRLinear, prune_
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.runtime import kernel_summary, preferring
    from deepsqueeze.train.loop import train_classifier

    data_ref = "digits" if ctx.quick else "fashion-mnist"
    epochs = 3 if ctx.quick else 10
    data = resolve_data(data_ref)
    base = resolve_model(f"zoo:lenet300@{data_ref}", progress=False)
    fp32_acc = accuracy(base.module, data)
    fp32_bytes = 4 * base.base_params
    tmp = Path(tempfile.mkdtemp())
    dense_size = save(base, tmp / "fp32.dsq")

    # ours
    ours = copy.deepcopy(base)
    config = PruneConfig(sparsity=SPARSITY, overrides=LAYER_SPARSITY, criterion="l1", schedule="agp", agp_end=0.6,
                         epochs=epochs, lr=1e-3, lr_schedule="cosine", storage="sparse", execution="auto")
    sctx = StageContext(ours, data=data, seed=ctx.seed, progress=False)
    start = time.perf_counter()
    prune_(ours, config, sctx)
    ours_s = time.perf_counter() - start
    size = save(ours, tmp / "ours.dsq")
    loaded = load(tmp / "ours.dsq")
    acc = accuracy(loaded.module, data)
    if acc != accuracy(ours.module, data):
        raise AssertionError("the loaded artifact does not evaluate like the model that was saved")

    # peer: torch.nn.utils.prune global L1 once, same fine-tuning
    peer = copy.deepcopy(base.module)
    linears = [(m, "weight") for m in peer.modules() if isinstance(m, nn.Linear)]
    start = time.perf_counter()
    amount = sum(round(v * base.module.get_submodule(k).weight.numel()) for k, v in LAYER_SPARSITY.items())
    torch_prune.global_unstructured(linears, pruning_method=torch_prune.L1Unstructured, amount=amount)
    peer_prune_s = time.perf_counter() - start
    peer_acc_oneshot = accuracy(peer, data)
    start = time.perf_counter()
    train_classifier(peer, data, epochs=epochs, lr=1e-3, batch_size=128, schedule="cosine", seed=ctx.seed,
                     progress=False)
    peer_s = time.perf_counter() - start
    for m, attr in linears:
        torch_prune.remove(m, attr)
    peer.eval()
    peer_acc = accuracy(peer, data)
    peer_model = copy.deepcopy(base)
    peer_model.module = peer
    peer_size = save(peer_model, tmp / "peer.dsq")

    sparse_layers = [n for n, m in loaded.module.named_modules() if isinstance(m, SparseCSRLinear)]
    one, big = data.test_x[:1], data.test_x[:256]
    fp32_m, ours_m, speed_m = base.module.eval(), loaded.module.eval(), load(tmp / "ours.dsq").module.eval()

    def fast(x: torch.Tensor) -> Any:
        with preferring("speed"):
            return speed_m(x)

    times = measure_latency_interleaved(
        {"fp32_b1": lambda: fp32_m(one), "ours_b1": lambda: ours_m(one), "speed_b1": lambda: fast(one),
         "peer_b1": lambda: peer(one), "fp32_b256": lambda: fp32_m(big), "ours_b256": lambda: ours_m(big),
         "speed_b256": lambda: fast(big), "peer_b256": lambda: peer(big)},
        warmup=3, repeat=5 if ctx.quick else 21, threads=ctx.threads)

    def kernels(module: nn.Module) -> str:
        """The kernel each CSR layer's race chose at batch 1 and 256 (``one`` / ``many``)."""
        choices = {n: m.kernel_choices() for n, m in module.named_modules() if isinstance(m, SparseCSRLinear)}
        return " ".join(f"{n}:{c.get('one')}/{c.get('many')}" for n, c in choices.items()) or "-"

    report = sctx.report[-1]
    weights = sum(m.weight.numel() for m in base.module.modules() if isinstance(m, nn.Linear))

    def row(method: str, accuracy_: float, nonzero: int, artifact: int, b1: float, b256: float,
            compress_s: float, extra: dict[str, Any]) -> dict[str, Any]:
        drop = round(100 * (fp32_acc - accuracy_), 2)
        return {
            "method": method, "fp32_accuracy": round(fp32_acc, 4), "accuracy": round(accuracy_, 4),
            "drop_pp": drop, "nonzero_params": nonzero, "params": base.base_params,
            "weight_sparsity": round(1 - (nonzero - (base.base_params - weights)) / weights, 4),
            "fp32_bytes": fp32_bytes, "artifact_bytes": artifact, "compression_ratio": round(fp32_bytes / artifact, 2),
            "finetune_epochs": epochs, "compress_s": round(compress_s, 1),
            "latency_ms_b1": round(b1, 4), "latency_ms_b256": round(b256, 3),
            "speedup_b1": round(times["fp32_b1"] / b1, 2), "speedup_b256": round(times["fp32_b256"] / b256, 2),
            **extra,
        }

    ours_row = row("ours: AGP global L1, sparse storage + CSR", acc, count_nonzero_params(ours_m), size,
                   times["ours_b1"], times["ours_b256"], ours_s,
                   {"layer_sparsity": " ".join(f"{k.split('.')[0]}:{v:.3f}" for k, v in report["layers"].items()),
                    "sparse_layers": " ".join(sparse_layers) or "-", "kernel_b1_b256": kernels(ours_m),
                    "target": f"drop <= {TARGET_DROP_PP} pp at {SPARSITY:.0%} sparsity"})
    ours_row["met"] = "yes" if ours_row["drop_pp"] <= TARGET_DROP_PP and ours_row["weight_sparsity"] >= SPARSITY else "no"
    speed_row = row("ours, --prefer speed (a dense copy kept where it races faster)", acc,
                    count_nonzero_params(speed_m), size, times["speed_b1"], times["speed_b256"], ours_s,
                    {"sparse_layers": " ".join(sparse_layers) or "-", "kernel_b1_b256": kernels(speed_m),
                     "target": "no slower than fp32 at batch 1 and 256"})
    speed_row["met"] = "yes" if min(speed_row["speedup_b1"], speed_row["speedup_b256"]) >= 1.0 else "no"
    ctx.notes.append(f"kernels: {kernel_summary(ours_m)} (memory); {kernel_summary(speed_m)} (speed)")
    peer_row = row("torch.nn.utils.prune global L1 once + same fine-tuning (dense file)", peer_acc,
                   count_nonzero_params(peer), peer_size, times["peer_b1"], times["peer_b256"], peer_prune_s + peer_s,
                   {"accuracy_before_finetune": round(peer_acc_oneshot, 4)})
    ctx.notes.append(f"fp32 artifact (raw) is {dense_size} bytes; fine-tuning {epochs} epochs for both.")
    return [ours_row, speed_row, peer_row]

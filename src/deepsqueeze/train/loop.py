"""A small, deterministic training loop reporting progress through :mod:`deepsqueeze.core.progress`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from deepsqueeze.core.outputs import class_logits
from deepsqueeze.core.progress import track
from deepsqueeze.data.datasets import ClassificationData
from deepsqueeze.errors import ModelError, NonFiniteLossError, RecipeError
from deepsqueeze.train import distributed

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[int, int], None]  # (global step, total steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def dropout_off(module: nn.Module) -> None:
    """Put dropout layers, and the modules owning one (whose forward reads ``self.training`` for their
    functional dropout, as Hugging Face attention does), in eval mode; everything else keeps its mode."""
    for m in module.modules():
        if isinstance(m, _DROPOUT) or any(isinstance(c, _DROPOUT) for c in m.children()):
            m.training = False  # this module only: eval() would recurse into its other children


def fit(
    module: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: LossFn,
    *,
    epochs: float = 1,
    steps_per_epoch: int,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    params: Iterable[nn.Parameter] | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
    before_step: StepCallback | None = None,
    after_step: StepCallback | None = None,
    dropout: bool = True,
) -> dict[str, float]:
    """Train ``module`` on ``batches(epoch)`` for ``epochs`` (fractions allowed) minimising ``loss_fn``.

    ``dropout=False`` trains with dropout off (:func:`dropout_off`): for matching a fixed teacher's outputs
    (quantization-aware training), where dropout noise would otherwise dominate the loss.

    ``before_step``/``after_step`` run around every optimiser step with (step, total steps): pruning
    schedules hook in there. Any submodule with a ``deepsqueeze_after_step()`` method (a mask, a
    codebook) has it called after every step, in every training run. Returns the last epoch's mean loss.

    Under ``torchrun --nproc-per-node N`` each step's batch is split across the processes and their
    gradients are averaged (see ``deepsqueeze.train.distributed``): the same updates as one process.
    """
    seed_everything(seed)
    trainable = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not trainable:
        raise RecipeError("nothing to train: every weight is frozen or stored as integer codes (e.g. after a "
                          "quantize stage); put the training stage before it, or use lora to train adapters")
    opt = _optimizer(optimizer, trainable, lr, weight_decay)
    total = max(1, int(round(epochs * steps_per_epoch)))
    sched = _scheduler(schedule, opt, total)
    constrained = [m for m in module.modules() if callable(getattr(m, "deepsqueeze_after_step", None))]
    module.train()
    if not dropout:
        dropout_off(module)
    rank, world_size = distributed.world()
    step, last_losses = 0, []
    epochs_total = -(-total // max(steps_per_epoch, 1))
    with track(description, total, "steps", enabled=None if progress and rank == 0 else False) as bar:
        epoch = 0
        while step < total:
            bar.set(f"{description}, epoch {epoch + 1}/{epochs_total}")
            last_losses = []
            for batch in batches(epoch):
                if step >= total:
                    break
                if before_step is not None:
                    before_step(step, total)
                opt.zero_grad(set_to_none=True)
                local, weight = distributed.shard(batch, rank, world_size)
                loss = loss_fn(module, local) * weight
                reported = distributed.mean_over_processes(loss.detach())
                if not torch.isfinite(reported):
                    raise NonFiniteLossError(f"loss became {reported.item()} at step {step}: "
                                             f"{first_non_finite(module, loss_fn, local)}")
                loss.backward()
                distributed.average_gradients(trainable)
                opt.step()
                sched.step()
                for m in constrained:  # e.g. pruning masks: pruned weights stay zero
                    m.deepsqueeze_after_step()
                step += 1
                last_losses.append(float(reported))
                if after_step is not None:
                    after_step(step, total)
                bar.advance(detail=f"loss {last_losses[-1]:.4f}")
            epoch += 1
    module.eval()
    return {"loss": float(np.mean(last_losses)) if last_losses else float("nan"), "steps": step}


def first_non_finite(module: nn.Module, loss_fn: LossFn, batch: Any) -> str:
    """Why a loss is not finite, for the error message: the first layer (in execution order) whose output
    holds NaN or Inf on ``batch``, or, when every output is finite, a step too large (the learning rate)."""
    from deepsqueeze.core.outputs import output_tensors

    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(mod: nn.Module, args: Any, out: Any) -> None:
            if not found and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                 for t in output_tensors(out)):
                inputs_finite = all(bool(torch.isfinite(t).all()) for t in output_tensors(args) if t.is_floating_point())
                found.append(f"{name or 'the model'} ({type(mod).__name__})" + ("" if inputs_finite else
                                                                                 " from non-finite inputs"))
        return check

    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children()) or n == ""]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            loss_fn(module, batch)
    except Exception:  # noqa: BLE001 - only a diagnosis: the FloatingPointError is what is raised
        pass
    finally:
        for h in handles:
            h.remove()
    if found:
        return (f"the first NaN or Inf comes out of {found[0]}: check that layer's weights and statistics "
                "(e.g. a BatchNorm with zero scale or variance)")
    return "every layer's output is finite, so the step was too large: lower the learning rate"


def train_classifier(
    module: nn.Module,
    data: ClassificationData,
    *,
    epochs: float = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    loss_fn: LossFn | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    limit: int | None = None,
    **hooks: Any,
) -> dict[str, float]:
    """Supervised training on ``data``'s train split (cross-entropy unless ``loss_fn`` is given)."""
    device = torch.device(device)
    module.to(device)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in data.batches("train", batch_size, shuffle=True, seed=seed * 1000 + epoch, limit=limit):
            yield x.to(device), y.to(device)

    def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else class_logits(out)
        if logits is None:
            raise ModelError(f"training on {data.name}'s labels needs class logits, but the model returns "
                             f"{type(out).__name__}: match the uncompressed model's outputs instead")
        return nn.functional.cross_entropy(logits, y)

    n = len(data.train_x) if limit is None else min(limit, len(data.train_x))
    return fit(
        module, batches, loss_fn or cross_entropy, epochs=epochs, steps_per_epoch=-(-n // batch_size),
        lr=lr, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, seed=seed,
        progress=progress, description=f"training on {data.name}", **hooks,
    )


def _optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


def _scheduler(name: str, opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    raise ValueError(f"unknown schedule {name!r}: use constant, cosine or onecycle")

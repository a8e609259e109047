"""Importance criteria: tiny callables that score weights (higher = more important).

An element criterion is ``(weight, grad) -> scores`` shaped like ``weight``; ``grad`` is only
read by first-order Taylor. Structured pruning sums element scores over each channel's slice
(``channel_scores``); BatchNorm scale is a channel criterion of its own (``bn_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch

from deepsqueeze.errors import RecipeError

ElementCriterion = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Criterion(StrEnum):
    L1 = "l1"
    L2 = "l2"
    RANDOM = "random"
    TAYLOR = "taylor"
    BN_SCALE = "bn_scale"


def magnitude_l1(weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """|w|: Han et al.'s magnitude criterion."""
    return weight.detach().abs()


def magnitude_l2(weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """w²: ranks single weights like |w|, and channels by their L2 norm once summed (sqrt is monotone)."""
    return weight.detach().float().pow(2)


def random_scores(seed: int = 0) -> ElementCriterion:
    """Uniform random scores from a private generator: the probabilistic pruning baseline."""
    generator = torch.Generator().manual_seed(seed)

    def score(weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return torch.rand(weight.shape, generator=generator).to(weight.device)

    return score


def taylor(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """|w · ∂L/∂w|: first-order estimate of the loss change when the weight is removed (Molchanov et al.)."""
    if grad is None:
        raise RecipeError("the taylor criterion needs gradients: give the stage training data (--data)")
    return (weight.detach() * grad.detach()).abs()


def bn_scale(gamma: torch.Tensor) -> torch.Tensor:
    """|γ| of a BatchNorm channel (Network Slimming): a channel the norm scales to ~0 carries nothing."""
    return gamma.detach().abs()


def element_criterion(criterion: Criterion | str, seed: int = 0) -> ElementCriterion:
    """The element-wise scoring callable for ``criterion`` (bn_scale is channel-level only)."""
    criterion = Criterion(criterion)
    if criterion is Criterion.L1:
        return magnitude_l1
    if criterion is Criterion.L2:
        return magnitude_l2
    if criterion is Criterion.RANDOM:
        return random_scores(seed)
    if criterion is Criterion.TAYLOR:
        return taylor
    raise RecipeError("criterion bn_scale scores channels, not single weights: use it with structured pruning")


def channel_scores(scores: torch.Tensor, dim: int, index_map: list[list[int]] | None = None) -> torch.Tensor:
    """Sum element scores over every slice along ``dim``; ``index_map[c]`` lists the slices of channel c
    (a flattened feature map gives each channel H*W consecutive input features)."""
    per_slice = scores.transpose(0, dim).reshape(scores.shape[dim], -1).float().sum(1)
    if index_map is None:
        return per_slice
    return torch.stack([per_slice[idx].sum() for idx in index_map])


def accumulate_gradients(module: torch.nn.Module, loss_batches: list[Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean gradient of each parameter over a few batches (``loss_batches``: closures returning a loss)."""
    grads: dict[str, torch.Tensor] = {}
    was_training = module.training
    module.train()
    for compute in loss_batches:
        module.zero_grad(set_to_none=True)
        compute().backward()
        for name, param in module.named_parameters():
            if param.grad is not None:
                grads[name] = grads.get(name, 0) + param.grad.detach() / len(loss_batches)
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    return grads

"""Low-rank factorization (SVD of Linear, Tucker-2 / CP of Conv2d) and LoRA recovery adapters."""

from deepsqueeze.lowrank.decompose import (
    Allocation,
    BudgetMetric,
    ConvMethod,
    LowRankConfig,
    RankRule,
    decompose_,
)
from deepsqueeze.lowrank.lora import (
    LoRAConfig,
    LoRALinear,
    LoRALoss,
    add_lora_,
    lora_parameters,
    merge_lora_,
    train_adapters,
)
from deepsqueeze.runtime import CPConv2d, LowRankLinear, Tucker2Conv2d

__all__ = [
    "Allocation",
    "BudgetMetric",
    "CPConv2d",
    "ConvMethod",
    "LoRAConfig",
    "LoRALinear",
    "LoRALoss",
    "LowRankConfig",
    "LowRankLinear",
    "RankRule",
    "Tucker2Conv2d",
    "add_lora_",
    "decompose_",
    "lora_parameters",
    "merge_lora_",
    "train_adapters",
]

"""``gguf_type``: one quantize stage that lays every tensor out as llama.cpp's ``llama-quantize`` would for a
file type (``Q4_K_M``, ``Q5_K_S``, ``Q4_0`` ...), with deepsqueeze's method (GPTQ, round-to-nearest) choosing
the codes on those grids, so ``export --format gguf`` carries them over unchanged.

:func:`tensor_grids` follows ``llama_tensor_get_type`` (llama.cpp ``src/llama-quant.cpp``) for dense decoder
LMs: the file type's default tensor type; ``Q6_K`` for the output head (and for a token embedding tied to
it), ``Q8_0`` where its rows are not whole 256-weight super-blocks; ``Q6_K`` for the value projections and
the down projections of the layers ``use_more_bits`` picks in ``*_K_M``, ``Q5_K`` for the first ones in
``Q4_K_S``; then llama.cpp's fallback where a row is not whole super-blocks (``Q4_K`` to ``Q5_0``, ``Q5_K``
to ``Q5_1``, ``Q6_K`` to ``Q8_0``). A row that is not whole blocks of 32 is left in float and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deepsqueeze.core.sharing import tied_weight_groups
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.primitives.kquant import K_GRIDS, SUPER_BLOCK, KGrid, kquant_qparams
from deepsqueeze.quant.config import GGUFType
from deepsqueeze.runtime import PackedIntEmbedding, PackedIntLinear

__all__ = ["TensorGrid", "packed_on_grid", "tensor_grids"]


@dataclass(frozen=True)
class TensorGrid:
    """How one tensor is coded: its GGUF ``type``, ``bits``, ``group`` (weights per scale), ``symmetric`` codes
    or ``float_zero`` points, and the k-quant ``kgrid`` its scales lie on (None for the 32-weight block types)."""

    type: str
    bits: int
    group: int
    symmetric: bool
    float_zero: bool
    kgrid: KGrid | None = None


_BLOCK_TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
_DEFAULT = {GGUFType.Q4_K_S: "Q4_K", GGUFType.Q4_K_M: "Q4_K", GGUFType.Q5_K_S: "Q5_K", GGUFType.Q5_K_M: "Q5_K",
            GGUFType.Q6_K: "Q6_K"}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _grid(kind: str) -> TensorGrid:
    if kind in K_GRIDS:
        k = K_GRIDS[kind]
        return TensorGrid(kind, k.bits, k.group, k.symmetric, not k.symmetric, k)
    bits, symmetric = _BLOCK_TYPES[kind]
    return TensorGrid(kind, bits, 32, symmetric, not symmetric)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _role(name: str, module: nn.Module, tied: set[str]) -> str:
    last = name.rsplit(".", 1)[-1]
    if last == "lm_head" or (isinstance(module, nn.Embedding) and name in tied):
        return "output"
    if isinstance(module, nn.Embedding):
        return "token_embd"
    return {"v_proj": "attn_v", "down_proj": "ffn_down"}.get(last, "")


def _type_of(gguf_type: GGUFType, role: str, index: int, count: int, cols: int) -> str:
    default = _DEFAULT.get(gguf_type, gguf_type.value.upper())
    kind = default
    if role == "output":
        kind = "Q8_0" if cols % SUPER_BLOCK or default == "Q8_0" else "Q6_K"
    elif role == "attn_v":
        if gguf_type in (GGUFType.Q4_K_M, GGUFType.Q5_K_M) and _use_more_bits(index, count):
            kind = "Q6_K"
        elif gguf_type is GGUFType.Q4_K_S and index < 4:
            kind = "Q5_K"
    elif role == "ffn_down":
        if gguf_type in (GGUFType.Q4_K_M, GGUFType.Q5_K_M) and _use_more_bits(index, count):
            kind = "Q6_K"
        elif gguf_type is GGUFType.Q4_K_S and index < count // 8:
            kind = "Q5_K"
    if kind in K_GRIDS and cols % SUPER_BLOCK:
        kind = _FALLBACK[kind]
    return kind


def tensor_grids(module: nn.Module, gguf_type: GGUFType | str) -> dict[str, TensorGrid | None]:
    """The grid of every ``nn.Linear`` and ``nn.Embedding`` of ``module`` by name under ``gguf_type``; None
    where a row (``in_features``, ``embedding_dim``) is not whole blocks of 32 (llama.cpp keeps it in F16)."""
    gguf_type = GGUFType(gguf_type)
    tied = {name for places in tied_weight_groups(module) for name, _ in places}
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    roles = {n: _role(n, m, tied) for n, m in layers}
    seen: dict[str, int] = {}
    totals = {r: sum(1 for v in roles.values() if v == r) for r in ("attn_v", "ffn_down")}
    grids: dict[str, TensorGrid | None] = {}
    for name, layer in layers:
        cols = layer.in_features if isinstance(layer, nn.Linear) else layer.embedding_dim
        role = roles[name]
        index = seen.get(role, 0)  # as llama.cpp counts: the i-th value (down) projection of the model
        seen[role] = index + 1
        grids[name] = None if cols % 32 else _grid(_type_of(gguf_type, role, index, totals.get(role, 1), cols))
    return grids


def packed_on_grid(layer: nn.Linear | nn.Embedding, grid: TensorGrid) -> PackedIntLinear | PackedIntEmbedding:
    """Round-to-nearest codes of ``layer``'s weight on ``grid``."""
    bits = grid.bits
    weight = layer.weight.detach().float()
    if isinstance(layer, nn.Embedding):
        out: PackedIntLinear | PackedIntEmbedding = PackedIntEmbedding(
            layer.num_embeddings, layer.embedding_dim, bits, grid.group, layer.padding_idx, grid.float_zero)
    else:
        out = PackedIntLinear(layer.in_features, layer.out_features, bits, grid.group, layer.bias is not None,
                              float_zero=grid.float_zero)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().float())
    if grid.kgrid is None:
        out.quantize_weight(weight, symmetric=grid.symmetric)
    else:
        scale, zero = kquant_qparams(weight, grid.kgrid)
        qp = Q.QParams(scale, zero, bits, False, Q.PerGroup(grid.group))
        out.set_codes(Q.quantize(weight, qp), scale, zero)
    return out.to(layer.weight.device)

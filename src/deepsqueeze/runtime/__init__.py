"""Runtime representations: how a compressed layer is stored, executed and exported.

A representation is named by what it holds, not by the algorithm that produced it (GPTQ, RTN, AWQ and QAT
all produce the same packed layer). One module per representation:

* ``int8``: :class:`Int8Linear`, :class:`Int8Conv2d`, :class:`Int8Embedding` (int8 codes, int8 activations);
* ``packed``: :class:`PackedIntLinear`, :class:`PackedIntConv2d`, :class:`PackedIntEmbedding` (1..8-bit
  weight-only codes, binary included) and :class:`PackedWeights` (packed weights of any layer kind);
* ``ternary``: :class:`PackedTernaryLinear`, :class:`PackedTernaryConv2d` (two-level ternary scales);
* ``sparse``: :class:`SparseCSRLinear` (a pruned Linear's weight as a CSR matrix);
* ``codebook``: :class:`CodebookWeight` (shared weights as centroids and indices) and :func:`shared_values`;
* ``factored``: :class:`LowRankLinear`, :class:`Tucker2Conv2d`, :class:`CPConv2d` (products of plain layers).

``kernels`` holds the kernels they run on and the per-CPU race that picks one (int8, packed, sparse).
Export forms follow one rule, one file per export format: ``onnx_forms`` maps every representation to what
it becomes in an ONNX graph (:func:`onnx_form`), ``gguf_forms`` what it becomes in a llama.cpp file
(:func:`gguf_form`), ``pte_forms`` in an ExecuTorch program (:func:`pte_form`); a new format adds one
``<format>_forms.py`` beside them, a new representation adds one module here and one entry in each forms file. A representation keeps its integers in buffers, so the artifact's ``raw`` encoding stores them
as they are; what the file does beyond that (the ``sparse``, codebook and ``int-grid`` encodings) and how the
loader rebuilds a layer (the replayed transforms) are registered by the technique that chooses them.

Import rules: runtime imports only ``core``, ``primitives`` and ``errors``, never a technique or an exporter
(tests/test_architecture.py). Techniques (quant, prune, share, lowrank) produce representations and
exporters read them through this package's public names (``from deepsqueeze.runtime import Int8Linear``),
never its modules; inside runtime, modules import their siblings directly.
"""

from deepsqueeze.runtime.codebook import CodebookWeight, shared_values
from deepsqueeze.runtime.factored import CPConv2d, LowRankLinear, Tucker2Conv2d, conv_geometry
from deepsqueeze.runtime.gguf_forms import GGUFForm, gguf_form
from deepsqueeze.runtime.int8 import (
    ACT_SCHEMES,
    CONV_INPUT_BITS,
    ActScheme,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    quantize_activation_per_token,
)
from deepsqueeze.runtime.kernels import (
    FACTORED_KERNELS,
    FBGEMM_ACT_BITS,
    INT8_KERNELS,
    PACKED_KERNELS,
    PREFERENCES,
    SPARSE_KERNELS,
    factored_kernel,
    forced_int8_kernel,
    int8_kernel,
    kernel_summary,
    preferred,
    preferring,
    reference_kernels,
    set_int8_kernel,
    set_packed_kernel,
    set_prefer,
    sparse_kernel,
)
from deepsqueeze.runtime.onnx_forms import onnx_form
from deepsqueeze.runtime.packed import (
    PackedInt4Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    PackedTensor,
    PackedWeights,
)
from deepsqueeze.runtime.pte_forms import pte_form
from deepsqueeze.runtime.sparse import CSR_BREAK_EVEN_SPARSITY, SparseCSRLinear
from deepsqueeze.runtime.ternary import PackedTernaryConv2d, PackedTernaryLinear

__all__ = [
    "ACT_SCHEMES",
    "CONV_INPUT_BITS",
    "CSR_BREAK_EVEN_SPARSITY",
    "FACTORED_KERNELS",
    "FBGEMM_ACT_BITS",
    "GGUFForm",
    "INT8_KERNELS",
    "PACKED_KERNELS",
    "PREFERENCES",
    "SPARSE_KERNELS",
    "ActScheme",
    "CPConv2d",
    "CodebookWeight",
    "Int8Conv2d",
    "Int8Embedding",
    "Int8Linear",
    "LowRankLinear",
    "PackedInt4Linear",
    "PackedIntConv2d",
    "PackedIntEmbedding",
    "PackedIntLinear",
    "PackedTensor",
    "PackedTernaryConv2d",
    "PackedTernaryLinear",
    "PackedWeights",
    "SparseCSRLinear",
    "Tucker2Conv2d",
    "conv_geometry",
    "factored_kernel",
    "forced_int8_kernel",
    "gguf_form",
    "int8_kernel",
    "kernel_summary",
    "onnx_form",
    "preferred",
    "preferring",
    "pte_form",
    "quantize_activation_per_token",
    "reference_kernels",
    "set_int8_kernel",
    "set_packed_kernel",
    "set_prefer",
    "shared_values",
    "sparse_kernel",
]

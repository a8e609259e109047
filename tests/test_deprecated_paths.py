"""Old import paths of moved code (the runtime representations, the distillation losses and sentence
batching, what search/study.py held) work for one release, with a DeprecationWarning."""

import importlib
import warnings

import pytest

from deepsqueeze import runtime
from deepsqueeze.errors import DeepsqueezeDeprecationWarning
from deepsqueeze.runtime import onnx_forms
from deepsqueeze.search import front, space, storage, trial
from deepsqueeze.train import losses, text

MOVED = [
    ("deepsqueeze.quant.modules", name, runtime)
    for name in ("Int8Linear", "Int8Conv2d", "Int8Embedding", "PackedIntLinear", "PackedInt4Linear", "PackedIntConv2d",
                 "PackedIntEmbedding", "CONV_INPUT_BITS", "forced_int8_kernel", "int8_kernel", "set_int8_kernel",
                 "set_packed_kernel", "quantize_activation_per_token")
] + [
    ("deepsqueeze.quant.packed_weights", "PackedWeights", runtime),
    ("deepsqueeze.quant.packed_weights", "PackedTensor", runtime),
    ("deepsqueeze.quant.ternary_modules", "PackedTernaryLinear", runtime),
    ("deepsqueeze.quant.ternary_modules", "PackedTernaryConv2d", runtime),
    ("deepsqueeze.quant.onnx_forms", "packed_linear_form", onnx_forms),
    ("deepsqueeze.quant.onnx_forms", "int8_linear_form", onnx_forms),
    ("deepsqueeze.prune.sparse", "SparseCSRLinear", runtime),
    ("deepsqueeze.prune.sparse", "sparse_kernel", runtime),
    ("deepsqueeze.prune.sparse", "CSR_BREAK_EVEN_SPARSITY", runtime),
    ("deepsqueeze.lowrank.modules", "LowRankLinear", runtime),
    ("deepsqueeze.lowrank.modules", "Tucker2Conv2d", runtime),
    ("deepsqueeze.lowrank.modules", "CPConv2d", runtime),
    ("deepsqueeze.share.share", "CodebookWeight", runtime),
    ("deepsqueeze.distill.losses", "soft_target_loss", losses),
    ("deepsqueeze.distill.losses", "HintAdapter", losses),
    ("deepsqueeze.distill.text", "sentence_batches", text),
    ("deepsqueeze.distill.text", "augment_sentences", text),
    ("deepsqueeze.search.study", "hypervolume_history", front),
    ("deepsqueeze.search.study", "compact_recipe", front),
    ("deepsqueeze.search.study", "load_space", space),
    ("deepsqueeze.search.study", "prepare_out", storage),
    ("deepsqueeze.search.study", "measure_point", trial),
]


@pytest.mark.parametrize("old,name,new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_path_warns_and_gives_the_same_object(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new.__name__}\.{name}"):
        value = getattr(module, name)
    assert value is getattr(new, name)


def test_from_import_of_an_old_path_warns():
    with pytest.warns(DeepsqueezeDeprecationWarning, match="deepsqueeze.runtime"):
        from deepsqueeze.quant.modules import PackedIntLinear
    assert PackedIntLinear is runtime.PackedIntLinear


def test_an_unknown_name_on_an_old_path_is_an_attribute_error():
    module = importlib.import_module("deepsqueeze.quant.modules")
    with pytest.raises(AttributeError, match="no_such_layer"):
        module.no_such_layer  # noqa: B018


def test_the_package_level_names_do_not_warn():
    """``deepsqueeze.quant.Int8Linear`` and friends are the packages' public API, not a moved path."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from deepsqueeze.lowrank import LowRankLinear
        from deepsqueeze.prune import SparseCSRLinear
        from deepsqueeze.quant import Int8Linear, PackedIntLinear
        from deepsqueeze.share import CodebookWeight
    assert (Int8Linear, PackedIntLinear, SparseCSRLinear, LowRankLinear, CodebookWeight) == (
        runtime.Int8Linear, runtime.PackedIntLinear, runtime.SparseCSRLinear, runtime.LowRankLinear,
        runtime.CodebookWeight)

"""Issue 11 findings 1 and 2: every quantizer covers the layer kinds users' models hold, or says so.

Each model is a tiny random-weight model (deepsqueeze.testing.user_models); each case checks what was
replaced (coverage record), that outputs stay close to the float model (SQNR), and that the .dsq
loads back and gives the same outputs.
"""

import warnings

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.coverage import coverage_totals
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.outputs import primary_output
from deepsqueeze.core.record import get_record
from deepsqueeze.errors import DeepsqueezeWarning, UnsupportedLayerError
from deepsqueeze.primitives.quantize import sqnr_db
from deepsqueeze.quant import Int8DynamicConfig, Int8StaticConfig, QuantizeConfig, WeightOnlyConfig, quantize_
from deepsqueeze.quant.api import plan_quantize

G = torch.Generator().manual_seed(0)
CASES = {
    "gpt2_lm": torch.randint(0, 1000, (2, 12), generator=G),
    "RecurrentTagger": torch.randn(2, 8, 24, generator=G),
    "MHAEncoder": torch.randn(2, 10, 12, generator=G),
    "ConvTransposeDecoder": torch.randn(2, 16, generator=G),
    "DictDetector": torch.randn(2, 1, 8, 8, generator=G),
}
CONFIGS = {
    "dynamic": (Int8DynamicConfig(), 30.0),
    "static": (Int8StaticConfig(), 25.0),
    "w4-rtn": (WeightOnlyConfig(bits=4, group_size=32), 12.0),
    "w4-gptq": (QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=False), 12.0),
}


def _model(name: str) -> Model:
    from deepsqueeze.zoo.resolve import resolve_base_model

    return resolve_base_model(f"py:deepsqueeze.testing.user_models:{name}", progress=False)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("name", list(CASES))
def test_every_weight_is_quantized_close_to_float_and_reloads(tmp_path, name, method):
    config, min_sqnr = CONFIGS[method]
    model, x = _model(name), CASES[name]
    with torch.no_grad():
        ref = primary_output(model.module(x))
    planned = plan_quantize(model.module, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeepsqueezeWarning)  # nothing may be left float silently or loudly
        quantize_(model.module, config, [x, x[:1]])
    coverage = get_record(model.module).coverage
    assert [(e.module, e.action) for e in coverage] == [(e.module, e.action) for e in planned]
    assert [e.into for e in coverage] == [e.into for e in planned]
    assert coverage_totals(coverage)[0]["covered_pct"] == 100.0
    with torch.no_grad():
        out = primary_output(model.module(x))
    assert sqnr_db(ref, out) > min_sqnr
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq", model=f"py:deepsqueeze.testing.user_models:{name}")
    with torch.no_grad():
        again = primary_output(loaded.module(x))
    assert torch.allclose(again, out, atol=1e-5, rtol=1e-4)
    assert count_params(loaded.module) == model.base_params


def test_gpt2_conv1d_projections_are_replaced():
    """Finding 1: c_attn / c_proj / c_fc (transformers Conv1D) were skipped silently; only wte/wpe changed."""
    model = _model("gpt2_lm")
    done = quantize_(model.module, Int8DynamicConfig())
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"} <= set(done)
    assert type(model.module.transformer.h[0].attn.c_attn).__name__ == "Int8Linear"


def test_tied_head_shares_one_quantized_table(tmp_path):
    model = _model("gpt2_lm")
    quantize_(model.module, WeightOnlyConfig(bits=4, group_size=32))
    m = model.module
    assert m.lm_head.codes is m.transformer.wte.codes
    entry = next(e for e in get_record(m).coverage if e.module == "lm_head")
    assert entry.action == "compressed" and entry.weights == 0 and "transformer.wte" in entry.reason
    size = save(model, tmp_path / "g.dsq")
    loaded = load(tmp_path / "g.dsq", model="py:deepsqueeze.testing.user_models:gpt2_lm").module
    assert loaded.lm_head.codes is loaded.transformer.wte.codes
    assert size < 4 * model.base_params / 4  # the 4-bit table is stored once


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bag(ids))


def test_unsupported_kind_warns_by_default_is_silent_on_skip_and_refused_on_error():
    with pytest.warns(DeepsqueezeWarning, match=r"does not handle bag \(embedding-bag\)"):
        quantize_(_Bag(), Int8DynamicConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeepsqueezeWarning)
        module = _Bag()
        quantize_(module, Int8DynamicConfig(), on_unsupported="skip")
    assert [(e.module, e.action) for e in get_record(module).coverage] == [("bag", "float"), ("fc", "compressed")]
    module = _Bag()
    with pytest.raises(UnsupportedLayerError, match="bag"):
        quantize_(module, Int8DynamicConfig(), on_unsupported="error")
    assert isinstance(module.fc, nn.Linear)  # refused before anything changed


def test_binary_claims_linear_and_conv2d_only():
    model = _model("RecurrentTagger")
    with pytest.warns(DeepsqueezeWarning, match="lstm"):
        quantize_(model.module, QuantizeConfig(method="binary", bits=2))
    actions = {e.module: e.action for e in get_record(model.module).coverage}
    assert actions == {"conv": "float", "lstm": "float", "gru": "float", "head": "compressed"}
    assert Task.CLASSIFIER  # py: models default to the classifier task

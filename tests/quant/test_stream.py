"""Block-by-block (streaming) weight-only quantization gives the blocks what in-memory quantization gives."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.core.record import get_record
from deepsqueeze.errors import RecipeError, UnsupportedLayerError
from deepsqueeze.quant import QuantizeConfig, quantize_
from deepsqueeze.quant.stream import quantize_blockwise_
from deepsqueeze.testing.block_models import TinyBlockNet, tiny_block_batches


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_blocks_equal_in_memory_blocks(method: str) -> None:
    config = QuantizeConfig(method=method, bits=4, group_size=16, embeddings=False)
    batches = tiny_block_batches()
    whole = TinyBlockNet(blocks=3)
    quantize_(whole, config.model_copy(update={"include": ("blocks.*",)}), batches)
    streamed = TinyBlockNet(blocks=3)
    seen: list[tuple[str, str]] = []
    replaced = quantize_blockwise_(streamed, config, batches,
                                   before_block=lambda n, b: seen.append(("before", n)),
                                   after_block=lambda n, b: seen.append(("after", n)))
    assert seen == [(w, f"blocks.{i}") for i in range(3) for w in ("before", "after")]
    assert len(replaced) == 15
    expected = {k: v for k, v in whole.state_dict().items() if k.startswith("blocks.")}
    got = {k: v for k, v in streamed.state_dict().items() if k.startswith("blocks.")}
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # the record reads as if the whole model had been quantized: full names, replayable
    targets = {t.target for t in get_record(streamed).transforms}
    assert targets == {t.target for t in get_record(whole).transforms}
    assert not get_record(streamed.blocks[0]).transforms


def test_streaming_refuses_methods_that_need_the_whole_model() -> None:
    with pytest.raises(RecipeError, match="weights only"):
        quantize_blockwise_(TinyBlockNet(), QuantizeConfig(method="dynamic"), tiny_block_batches())


def test_streaming_needs_a_block_stack() -> None:
    with pytest.raises(UnsupportedLayerError, match="no stack of repeated blocks"):
        quantize_blockwise_(torch.nn.Sequential(torch.nn.Linear(4, 4)), QuantizeConfig(method="rtn", bits=4),
                            [torch.randn(2, 4)])

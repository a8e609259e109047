"""A language-model head tied to the token embedding (Qwen2, SmolLM2, GPT-2) is one table in the float model, so it
stays one table quantized: the head computes with the embedding's codes (its ``embedding_bits``), in every
weight-only method, and the artifact stores them once."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.data.datasets import TextData
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.testing.hf_models import make_hf_dir


def _text() -> TextData:
    lines = [f"the {w} sat on the mat number {i} and looked at the {w}." for i, w in
             enumerate(["cat", "dog", "bird", "fox", "cow", "hen", "pig", "ant"] * 4)]
    return TextData("text:calib", lines)


def _head_and_table(module: torch.nn.Module):
    mods = dict(module.named_modules())
    head = next(m for n, m in mods.items() if n.endswith("lm_head"))
    table = next(m for n, m in mods.items() if n.endswith(("embed_tokens", "wte")))
    return head, table


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "mixed"])
def test_a_tied_head_computes_with_the_embeddings_codes_and_the_file_stores_them_once(family, method, tmp_path):
    folder = make_hf_dir(family, tmp_path / family)
    model = resolve_model(f"hf:{folder}", progress=False)
    stage = {"type": "quantize", "method": method, "bits": 4, "group_size": 16, "embedding_bits": 8}
    if method != "rtn":
        stage["calibration_samples"] = 8
    if method == "mixed":
        stage.update(bits=8, avg_bits=5.0)
    run_stages(model, parse_recipe({"stages": [stage]}), _text(), progress=False)
    head, table = _head_and_table(model.module)
    assert type(head).__name__ == "PackedIntLinear" and type(table).__name__ == "PackedIntEmbedding"
    assert head.bits == table.bits == 8
    assert head.codes is table.codes and head.scale is table.scale and head.zero_point is table.zero_point
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq")
    head2, table2 = _head_and_table(loaded.module)
    assert head2.codes is table2.codes
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded.module(input_ids=ids), model.module(input_ids=ids))

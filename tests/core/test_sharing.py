"""Finding 3 of issue 11: tied weights are counted, stored and pruned once."""

import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.sharing import shared_tensors
from deepsqueeze.zoo.resolve import resolve_base_model

GPT2 = "py:deepsqueeze.testing.user_models:gpt2_lm"
TIED = "py:deepsqueeze.testing.user_models:TiedLM"


def _unique_elements(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def test_gpt2_tied_head_counts_once():
    model = resolve_base_model(GPT2, progress=False)
    m = model.module
    assert m.lm_head.weight is m.transformer.wte.weight
    unique = _unique_elements(m)
    assert count_params(m) == unique == model.base_params
    # the old walk counted the tied table twice: unique + 1000 x 64
    assert count_params(m) < sum(p.numel() for mod in m.modules() for p in mod.parameters(recurse=False))
    assert count_nonzero_params(m) == sum(int((p != 0).sum()) for p in m.parameters())


def test_reused_module_counts_once():
    shared = torch.nn.Linear(8, 8)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert count_params(net) == 72


def test_tied_table_stored_once_and_retied_at_load(tmp_path):
    model = resolve_base_model(GPT2, progress=False)
    unique_bytes = 4 * _unique_elements(model.module)
    size = save(model, tmp_path / "g.dsq")
    assert size <= unique_bytes * 1.01 + 20_000  # header and manifest
    assert size < unique_bytes + 64_000 * 4  # not a second copy of the 1000 x 64 table
    loaded = load(tmp_path / "g.dsq", model=GPT2)
    lm = loaded.module
    assert lm.lm_head.weight is lm.transformer.wte.weight
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, model.module(ids).logits)
    assert loaded.meta["manifest"]["ties"] == {"lm_head.weight": "transformer.wte.weight"}


def test_shared_tensors_finds_aliases_only():
    a = torch.zeros(3, 4)
    state = {"x": a, "y": torch.zeros(3, 4), "z": a, "v": a[1:]}
    assert shared_tensors(state) == {"z": "x"}


def test_torch_tied_model_round_trips(tmp_path):
    model = resolve_base_model(TIED, progress=False)
    save(model, tmp_path / "t.dsq")
    loaded = load(tmp_path / "t.dsq", model=TIED)
    assert loaded.module.lm_head.weight is loaded.module.embed.weight
    assert count_params(loaded.module) == model.base_params == 200 * 32 + 32 * 32 + 32

"""Weight sharing: clustering in place, centroid fine-tuning (summed gradients, fixed indices, zeros
kept), the share/encode stages, and exact .dsq round trips of the whole Deep Compression pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.codec.format import read_manifest
from deepsqueeze.core.config import config_from_dict, config_to_dict
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.record import get_record
from deepsqueeze.errors import ArtifactError, RecipeError
from deepsqueeze.eval.metrics import accuracy
from deepsqueeze.prune import PruneConfig, prune_
from deepsqueeze.recipes.run import compress, run_stages
from deepsqueeze.recipes.schema import load_recipe, parse_recipe
from deepsqueeze.share import CodebookWeight, EncodeConfig, ShareConfig, encode_, layer_bits, share_
from deepsqueeze.testing.forge import split_artifact
from deepsqueeze.testing.models import TinyMLP, tiny_classification_data, tiny_model_handle

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _pipeline(data, seed: int = 0):
    model = tiny_model_handle()
    recipe = parse_recipe({"seed": seed, "stages": [
        {"type": "prune", "sparsity": 0.8, "schedule": "agp", "epochs": 2, "lr": 0.01},
        {"type": "share", "bits": 3, "overrides": {"fc3": 4}, "bias_bits": 3, "epochs": 1, "lr": 0.001},
        {"type": "encode"},
    ]})
    ctx = run_stages(model, recipe, data, progress=False)
    return model, ctx


def test_share_clusters_nonzeros_and_keeps_zeros() -> None:
    module = TinyMLP()
    with torch.no_grad():
        module.fc1.weight[:, ::2] = 0
    zeros = module.fc1.weight == 0
    share_(module, ShareConfig(bits=2, overrides={"fc3": 1}, method="exact"))
    w = module.fc1.weight
    assert torch.equal(w == 0, zeros)
    assert torch.unique(w[w != 0]).numel() <= 4
    assert torch.unique(module.fc3.weight).numel() <= 2
    assert torch.unique(module.fc2.bias).numel() == 16  # biases untouched without bias_bits
    assert get_record(module).encodings["fc1.weight"]["encoding"] == "sparse-codebook"
    assert get_record(module).encodings["fc2.weight"]["encoding"] == "codebook"


def test_layer_bits_precedence() -> None:
    cfg = ShareConfig(bits=5, linear_bits=4, conv_bits=8, overrides={"head*": 2})
    assert layer_bits("head.fc", nn.Linear(2, 2), cfg) == 2
    assert layer_bits("fc1", nn.Linear(2, 2), cfg) == 4
    assert layer_bits("conv", nn.Conv2d(1, 1, 3), cfg) == 8
    assert layer_bits("fc1", nn.Linear(2, 2), ShareConfig(bits=6)) == 6


def test_exact_sharing_has_lower_error_than_lloyd() -> None:
    errs = {}
    for method in ("lloyd", "exact"):
        torch.manual_seed(0)
        module = TinyMLP()
        before = module.fc1.weight.detach().clone()
        share_(module, ShareConfig(bits=3, method=method, init="random"))
        errs[method] = float(((module.fc1.weight.detach() - before) ** 2).sum())
    assert errs["exact"] <= errs["lloyd"] + 1e-12


def test_centroid_gradient_is_the_sum_of_its_weights_gradients() -> None:
    centroids = torch.tensor([-1.0, 0.5, 2.0])
    indices = torch.tensor([[0, 1, 2], [2, 2, 0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    param = CodebookWeight(centroids, indices, mask)
    upstream = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1
    w = param(torch.empty(2, 3))
    assert torch.equal(w, torch.tensor([[-1.0, 0.5, 0.0], [2.0, 2.0, -1.0]]))
    (w * upstream).sum().backward()
    # centroid 0: entries (0,0)=1 and (1,2)=6; centroid 1: (0,1)=2; centroid 2: (1,0)=4 + (1,1)=5, (0,2) pruned
    assert torch.equal(param.centroids.grad, torch.tensor([7.0, 2.0, 9.0]))


def test_pipeline_fine_tunes_centroids_and_round_trips_exactly(tmp_path: Path) -> None:
    data = tiny_classification_data()
    model, ctx = _pipeline(data)
    m = model.module
    for layer, bits in (("fc1", 3), ("fc2", 3), ("fc3", 4)):
        w = getattr(m, layer).weight
        assert torch.unique(w[w != 0]).numel() <= 2**bits
        assert torch.unique(getattr(m, layer).bias).numel() <= 8
    assert not hasattr(m.fc1, "parametrizations")  # fine-tuning leaves plain layers behind
    rows = {row["stage"]: row for row in ctx.report}
    assert set(rows) == {"prune", "share", "encode"}
    for row in rows.values():
        assert {"bytes", "ratio", "accuracy"} <= set(row)
    assert rows["encode"]["bytes"] <= rows["share"]["bytes"] < rows["prune"]["bytes"]
    assert all(not isinstance(v, (dict, list)) for row in rows.values() if row["stage"] != "prune" for v in row.values())
    assert {s["tensor"] for s in ctx.extras["encode_streams"]} >= {"fc1.weight", "fc1.bias"}
    assert rows["encode"]["index_bytes"] >= 0.99 * rows["encode"]["index_shannon_bytes"]
    size = save(model, tmp_path / "dc.dsq")
    manifest = read_manifest(tmp_path / "dc.dsq")[0]
    kinds = {t["name"]: t["encoding"] for t in manifest["tensors"]}
    assert kinds["fc1.weight"] == "sparse-codebook-entropy" and kinds["fc1.bias"] == "codebook-entropy"
    loaded = load(tmp_path / "dc.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = data.test_x
    assert torch.equal(loaded.module(x), m(x))
    assert accuracy(loaded.module, data) == accuracy(m, data) == pytest.approx(rows["encode"]["accuracy"], abs=1e-4)
    assert size > rows["encode"]["bytes"] and rows["encode"]["bytes"] < 0.2 * 4 * model.base_params  # tensor payload
    again, _ = _pipeline(data)  # deterministic: same seed, same bytes
    save(again, tmp_path / "again.dsq")
    assert (tmp_path / "again.dsq").read_bytes() == (tmp_path / "dc.dsq").read_bytes()


def test_a_run_that_does_not_evaluate_leaves_quality_out_of_the_stage_rows(monkeypatch, tmp_path: Path) -> None:
    """``compress(evaluate_result=False)`` (search scores the file itself): the share and encode rows keep
    their bytes and ratio but no stage scores the model (three full passes over the data before)."""
    import deepsqueeze.share.share as share_module

    scored = []
    monkeypatch.setattr(share_module, "_accuracy", lambda module, data: scored.append(1) or 0.5)
    data = tiny_classification_data()
    recipe = parse_recipe({"stages": [{"type": "share", "bits": 3, "epochs": 0}, {"type": "encode"}]})
    ctx = run_stages(tiny_model_handle(), recipe, data, progress=False, evaluate=False)
    assert not scored and all("bytes" in row and "accuracy" not in row for row in ctx.report)
    ctx = run_stages(tiny_model_handle(), recipe, data, progress=False)
    assert scored and all(row["accuracy"] == 0.5 for row in ctx.report)
    scored.clear()
    result = compress("zoo:lenet300@digits", recipe, tmp_path / "m.dsq", "digits", progress=False,
                      evaluate_result=False)
    assert not scored and "accuracy" not in result.stage_reports[0] and not result.metrics


def test_flipped_byte_in_any_coded_segment_fails_to_load(tmp_path: Path) -> None:
    model = tiny_model_handle()
    ctx = StageContext(model, data=tiny_classification_data(), progress=False)
    prune_(model, PruneConfig(sparsity=0.8), ctx)
    share_(model, ShareConfig(bits=3, bias_bits=2), ctx)
    encode_(model, EncodeConfig(), ctx)
    path = tmp_path / "dc.dsq"
    save(model, path)
    raw = path.read_bytes()
    start = len(raw) - len(split_artifact(raw)[2])  # where the payload begins
    manifest = read_manifest(path)[0]
    coded = [t for t in manifest["tensors"] if "codebook" in t["encoding"]]
    assert len(coded) == 6
    for entry in coded:
        for offset, length, _ in entry["segments"]:
            for where in {0, length // 2, length - 1}:
                if length == 0:
                    continue
                bad = bytearray(raw)
                bad[start + offset + where] ^= 0x5A
                (tmp_path / "bad.dsq").write_bytes(bytes(bad))
                with pytest.raises(ArtifactError):
                    load(tmp_path / "bad.dsq", model="py:deepsqueeze.testing.models:TinyMLP")


def test_configs_round_trip_and_reject_bad_values() -> None:
    for cfg in (ShareConfig(bits=4, conv_bits=8, overrides={"fc*": 3}, bias_bits=6, method="exact", epochs=1),
                EncodeConfig(positions="bitmap", coder="ans")):
        assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(RecipeError):
        ShareConfig(bits=0)
    with pytest.raises(RecipeError):
        ShareConfig(overrides={"fc1": 17})
    with pytest.raises(RecipeError):
        ShareConfig(init="kmeans++")


def test_stage_errors_name_the_fix() -> None:
    with pytest.raises(RecipeError, match="share stage before"):
        encode_(TinyMLP())
    with pytest.raises(RecipeError, match="include/exclude"):
        share_(TinyMLP(), ShareConfig(include=["nothing*"]))
    from deepsqueeze.errors import DataError

    with pytest.raises(DataError, match="--data"):
        share_(TinyMLP(), ShareConfig(epochs=1))


def test_shipped_recipes_parse() -> None:
    for name in ("deep-compression.yaml", "deep-compression-lenet300.yaml", "deep-compression-lenet5.yaml"):
        recipe = load_recipe(RECIPES / name)
        assert [s.stage_type for s in recipe.stages] == ["prune", "share", "encode"]


def test_deep_compression_can_store_its_centroids_and_other_floats_in_two_bytes(tmp_path):
    """Issue 24: on a residual CNN after Deep Compression fp32 codebooks and BatchNorm tensors were over half the
    file. ``centroid_dtype: float16`` rounds the trained centroids and ``float_dtype: float16`` (encode) the
    other float tensors; the model is measured as rounded, and the file holds exactly that model in less."""
    from deepsqueeze.resolve import resolve_model

    data = tiny_classification_data()
    sizes, models = {}, {}
    for dtype in ("float32", "float16"):
        torch.manual_seed(0)
        model = resolve_model("py:deepsqueeze.testing.models:TinyResNet", progress=False)
        recipe = parse_recipe({"stages": [
            {"type": "prune", "sparsity": 0.8, "scope": "global"},
            {"type": "share", "bits": 4, "conv_bits": 6, "epochs": 1, "lr": 0.001, "centroid_dtype": dtype},
            {"type": "encode", "float_dtype": dtype}]})
        ctx = run_stages(model, recipe, data, progress=False)
        save(model, tmp_path / f"{dtype}.dsq")
        sizes[dtype], models[dtype] = (tmp_path / f"{dtype}.dsq").stat().st_size, model
        if dtype == "float16":
            assert ctx.report[-1]["float16_tensors"] > 0
    specs = {e["name"]: e for e in read_manifest(tmp_path / "float16.dsq")[0]["tensors"]}
    assert specs["stem.1.running_var"]["encoding"] == "narrow-float"
    assert all(s["meta"].get("cb") for s in specs.values() if "codebook" in s["encoding"])
    assert sizes["float16"] < 0.92 * sizes["float32"], sizes
    loaded = load(tmp_path / "float16.dsq", "py:deepsqueeze.testing.models:TinyResNet")
    for name, tensor in models["float16"].module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor), name


def test_a_loaded_artifact_with_two_byte_floats_compresses_again(tmp_path):
    """``narrow-float`` is the writer's choice for values it holds exactly: a model loaded from such a file and
    trained further (its BatchNorm no longer exact in 2 bytes) is written again, raw where it must be."""
    from deepsqueeze.resolve import resolve_model

    data = tiny_classification_data()
    torch.manual_seed(0)
    model = resolve_model("py:deepsqueeze.testing.models:TinyResNet", progress=False)
    run_stages(model, parse_recipe({"stages": [{"type": "share", "bits": 4, "centroid_dtype": "float16"},
                                               {"type": "encode", "float_dtype": "float16"}]}), data, progress=False)
    save(model, tmp_path / "a.dsq")
    loaded = load(tmp_path / "a.dsq", "py:deepsqueeze.testing.models:TinyResNet")
    assert "stem.1.running_var" not in get_record(loaded.module).encodings
    run_stages(loaded, parse_recipe({"stages": [{"type": "finetune", "epochs": 1, "lr": 0.01}]}), data,
               progress=False)
    save(loaded, tmp_path / "b.dsq")
    specs = {e["name"]: e for e in read_manifest(tmp_path / "b.dsq")[0]["tensors"]}
    assert specs["stem.1.running_var"]["encoding"] == "raw"

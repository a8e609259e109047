"""ExecuTorch export (issue 28, item 1): a .pte program with the XNNPACK delegate carrying the model's own codes,
run by ExecuTorch's runtime and compared with the torch model before anything is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("executorch")

from deepsqueeze.artifact import load, save  # noqa: E402
from deepsqueeze.codec.format import read_manifest, tensor_payload_bytes  # noqa: E402
from deepsqueeze.core.counting import count_params  # noqa: E402
from deepsqueeze.core.model import Model, Task, py_base  # noqa: E402
from deepsqueeze.errors import ArtifactError, ModelError  # noqa: E402
from deepsqueeze.export import export  # noqa: E402
from deepsqueeze.export.pte import PteModule  # noqa: E402
from deepsqueeze.quant import Int8DynamicConfig, WeightOnlyConfig, forced_int8_kernel, quantize_  # noqa: E402
from deepsqueeze.resolve import resolve_model  # noqa: E402
from deepsqueeze.runtime import PackedIntConv2d, PackedIntLinear, PackedTernaryLinear  # noqa: E402
from deepsqueeze.testing.models import tiny_model_handle  # noqa: E402
from tests.export._models import tiny_encoder, tiny_factory  # noqa: E402


def _mlp(*layers: nn.Module) -> Model:
    module = nn.Sequential(*layers).eval()
    return Model(module, py_base(module), Task.CLASSIFIER, "mlp", count_params(module), (64,), 10)


def _float_mlp() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)]


def _close(model: Model, path, rows: int = 5) -> float:
    """Worst 1 - cos between the program and the torch model on a batch of another size than the check's."""
    x = torch.randn(rows, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), forced_int8_kernel("int_mm"):
        ours = model.module(x)
    theirs = PteModule(path, model.module, 2)(x)
    return float((1 - torch.nn.functional.cosine_similarity(ours, theirs)).max())


def test_a_float_model_runs_in_xnnpack_exactly_at_any_batch(tmp_path):
    model = _mlp(*_float_mlp())
    result = export(model, "pte", tmp_path / "m.pte")
    assert result.format == "pte" and result.layers == []
    assert result.check["worst_cosine_distance"] <= 1e-6 and result.check["delegated"]["xnnpack_subgraphs"] >= 1
    assert _close(model, tmp_path / "m.pte") <= 1e-6
    assert _close(model, tmp_path / "m.pte", rows=1) <= 1e-6


@pytest.mark.parametrize("bits,group,symmetric,binary", [
    (4, 32, True, False), (4, 32, False, False), (4, None, False, False), (3, 32, False, False),
    (2, None, True, False), (8, None, False, False), (6, None, True, False), (1, None, False, True)])
def test_every_packed_linear_the_delegate_takes_carries_its_codes(tmp_path, bits, group, symmetric, binary):
    """Codes of 1..4 bits become XNNPACK's signed 4-bit weights (zero points as a group-sum term), 5..8-bit codes
    per channel its 8-bit ones: the file is smaller than the float weights and agrees with the .dsq's layer."""
    fc1, relu, fc2 = _float_mlp()
    layer = PackedIntLinear.from_float(fc1, bits=bits, group_size=group, symmetric=symmetric, binary=binary)
    model = _mlp(layer, relu, fc2)
    result = export(model, "pte", tmp_path / "m.pte")
    row = {r["module"]: r for r in result.layers}["0"]
    assert row["exported_as"].startswith("XNNPACK qd8-qc4w" if bits <= 4 and group is None else
                                         "XNNPACK qd8-qb4w" if bits <= 4 else "XNNPACK qd8-qc8w"), row
    assert row["runs_on"].startswith("XNNPACK")
    assert _close(model, tmp_path / "m.pte") <= 1e-3
    float_bytes = 4 * sum(p.numel() for p in (fc1.weight, fc2.weight))
    assert result.bytes < float_bytes + 4096


def test_int8_layers_keep_their_int8_codes(tmp_path):
    model = tiny_model_handle()
    quantize_(model.module, Int8DynamicConfig(activations="per_token"))
    result = export(model, "pte", tmp_path / "m.pte")
    assert {r["exported_as"] for r in result.layers} == {
        "XNNPACK qd8-qc8w: int8 weights, per-token dynamic int8 activations"}
    assert {r["runs_on"] for r in result.layers} == {"XNNPACK"}
    assert result.check["tolerance"] == 2e-2 and result.check["worst_cosine_distance"] <= 1e-3


def test_static_int8_cnn_runs_xnnpacks_integer_convolutions(tmp_path, digits):
    from deepsqueeze.recipes import compress, load_recipe

    out = tmp_path / "cnn.dsq"
    compress("py:deepsqueeze.testing.models:DepthwiseSeparableCNN", load_recipe("int8-static"), out, "digits",
             progress=False, evaluate_result=False)
    model = load(out, model="py:deepsqueeze.testing.models:DepthwiseSeparableCNN")
    images = torch.cat([x for x, _ in digits.batches("test", batch_size=256)])
    result = export(model, "pte", tmp_path / "cnn.pte", sample=images[:32])
    convs = [r for r in result.layers if r["kind"] == "Int8Conv2d"]
    assert convs and all(r["runs_on"] == "XNNPACK" for r in convs), result.layers
    fp32 = resolve_model("py:deepsqueeze.testing.models:DepthwiseSeparableCNN", progress=False)
    fp32.input_shape, fp32.num_classes = model.input_shape, model.num_classes
    float_bytes = export(fp32, "pte", tmp_path / "fp32.pte", sample=images[:32]).bytes
    payload = sum(tensor_payload_bytes(read_manifest(out)[0]).values())
    assert result.bytes <= float_bytes - payload  # int8 weights: about a quarter of the float ones
    with torch.no_grad():
        ours = model.module(images).argmax(1)
    theirs = PteModule(tmp_path / "cnn.pte", model.module, 2)(images).argmax(1)
    assert float((ours == theirs).double().mean()) >= 0.99


SENTENCES = [f"sentence {i} about {'quantized ' * (i % 9)}models on phones" for i in range(12)]


def test_a_sentence_encoder_runs_at_every_batch_and_length(tmp_path):
    """4-bit groups (qb4w) and packed embedding rows; an int8 encoder takes the same paths as the int8 MLP."""
    model = tiny_encoder()
    quantize_(model.module, WeightOnlyConfig(bits=4, group_size=32))
    save(model, tmp_path / "e.dsq")
    loaded = load(tmp_path / "e.dsq", model=tiny_factory)
    result = export(loaded, "pte", tmp_path / "e.pte")
    assert result.layers and all(r["runs_on"].startswith("XNNPACK") for r in result.layers
                                 if r["kind"] != "Int8Embedding")
    program = PteModule(tmp_path / "e.pte", loaded.module, 2)
    ours, theirs = loaded.module.encode(SENTENCES), program.encode(SENTENCES)
    assert float(torch.nn.functional.cosine_similarity(ours, theirs).min()) > 0.995
    alone = torch.cat([program.encode([s]) for s in SENTENCES[:3]])
    assert float((1 - torch.nn.functional.cosine_similarity(alone, theirs[:3])).max()) <= 1e-4


def _ternary() -> PackedTernaryLinear:
    layer, g = PackedTernaryLinear(64, 96), torch.Generator().manual_seed(0)
    layer.set_levels(torch.randint(-1, 2, (96, 64), generator=g), torch.rand(96, 1, generator=g) + 0.1,
                     torch.rand(96, 1, generator=g) + 0.1)
    return layer


@pytest.mark.parametrize("layer,why", [
    (lambda: _ternary(), "PackedTernaryLinear codes are not"),
    (lambda: PackedIntLinear.from_float(nn.Linear(64, 96), bits=6, group_size=32), "no grouped 6-bit"),
    (lambda: PackedIntLinear.from_float(nn.Linear(64, 96), bits=4, group_size=16), "multiples of 32"),
])
def test_codes_xnnpack_cannot_take_are_decoded_on_the_portable_kernels_and_said_so(tmp_path, layer, why):
    model = _mlp(layer(), nn.ReLU(), nn.Linear(96, 10))
    result = export(model, "pte", tmp_path / "m.pte")
    row = {r["module"]: r for r in result.layers}["0"]
    assert why in row["exported_as"] and "portable" in row["runs_on"], row
    assert _close(model, tmp_path / "m.pte") <= 1e-6


@pytest.mark.parametrize("bits,symmetric", [(4, False), (2, True), (8, False)])
def test_packed_convolutions_run_xnnpacks_dynamic_int8_convolution_on_their_codes(tmp_path, bits, symmetric):
    torch.manual_seed(bits)
    conv = nn.Sequential(PackedIntConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), bits=bits, symmetric=symmetric),
                         nn.ReLU(), nn.Flatten()).eval()
    model = Model(conv, py_base(conv), Task.CLASSIFIER, "conv", count_params(conv), (3, 8, 8), None)
    result = export(model, "pte", tmp_path / "c.pte")
    assert result.layers[0]["exported_as"].startswith("XNNPACK qd8 convolution"), result.layers
    assert result.layers[0]["runs_on"].startswith("XNNPACK")
    assert (result.layers[0]["runs_on"] == "XNNPACK") == symmetric  # zero points: the input-sum term
    assert _close(model, tmp_path / "c.pte") <= 1e-3


def test_kernels_xnnpack_takes_as_depthwise_run_decoded_and_recurrent_codes_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    conv = nn.Sequential(PackedIntConv2d.from_float(nn.Conv2d(1, 4, 3)), nn.Flatten()).eval()
    model = Model(conv, py_base(conv), Task.CLASSIFIER, "conv", count_params(conv), (1, 8, 8), None)
    result = export(model, "pte", tmp_path / "c.pte")
    assert result.layers[0]["runs_on"] == "XNNPACK" and result.check["worst_cosine_distance"] <= 1e-6
    assert "decoded to float32" in result.layers[0]["exported_as"] and "depthwise" in result.layers[0]["exported_as"]
    from deepsqueeze.testing import user_models

    module = user_models.RecurrentTagger().eval()
    tagger = Model(module, py_base(module), Task.CLASSIFIER, "rnn", count_params(module), module.input_shape, None)
    quantize_(tagger.module, WeightOnlyConfig(bits=4, group_size=None))
    with pytest.raises(ModelError, match="layer .*cannot be exported to ExecuTorch: packed weights of recurrent") as err:
        export(tagger, "pte", tmp_path / "r.pte")
    assert "\n" not in str(err.value) and not (tmp_path / "r.pte").exists()


def test_causal_lms_are_refused_before_any_file(tmp_path):
    pytest.importorskip("transformers")
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    lm = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'llama')}", progress=False)
    with pytest.raises(ModelError, match="KV cache.*gguf"):
        export(lm, "pte", tmp_path / "l.pte")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_force_replaces_only_an_earlier_program(tmp_path):
    model = _mlp(*_float_mlp())
    export(model, "pte", tmp_path / "m.pte")
    export(model, "pte", tmp_path / "m.pte", overwrite=True)
    (tmp_path / "other.pte").write_bytes(b"not a program")
    with pytest.raises(ArtifactError, match="not one"):
        export(model, "pte", tmp_path / "other.pte", overwrite=True)
    assert (tmp_path / "other.pte").read_bytes() == b"not a program"
    with pytest.raises(ArtifactError, match=r"\.pte"):
        export(model, "pte", tmp_path / "m.bin")


def test_the_cli_exports_an_artifact_and_lists_where_each_layer_runs(tmp_path, capsys):
    import json

    from deepsqueeze.testing.cli import run

    model = tiny_model_handle()
    quantize_(model.module, WeightOnlyConfig(bits=4, group_size=None))
    save(model, tmp_path / "m.dsq")
    code, out, err = run(capsys, "export", str(tmp_path / "m.dsq"), "--format", "pte", "--out",
                         str(tmp_path / "m.pte"), "--model-code", "py:deepsqueeze.testing.models:TinyMLP", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["format"] == "pte" and summary["bytes"] == (tmp_path / "m.pte").stat().st_size
    assert {row["runs_on"].split(" +")[0] for row in summary["layers"]} == {"XNNPACK"}
    assert "cpuinfo" not in err and "Failed to load" not in err
    code, _, err = run(capsys, "export", str(tmp_path / "m.dsq"), "--format", "pte", "--out", str(tmp_path / "m.pte"),
                       "--model-code", "py:deepsqueeze.testing.models:TinyMLP")
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_evaluate_backend_pte_runs_the_program_and_reports_its_bytes(tmp_path, capsys, digits):
    import json

    from deepsqueeze.testing.cli import run

    ref = "py:deepsqueeze.testing.models:PlainMLP"
    dsq = tmp_path / "m.dsq"
    code, _, err = run(capsys, "compress", "--model", ref, "--recipe", "int8-dynamic", "--data", "digits",
                       "--out", str(dsq), "--json")
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", str(dsq), "--model-code", ref, "--data", "digits", "--backend", "pte",
                         "--no-latency", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backend"] == "pte" and result["artifact_bytes"] != dsq.stat().st_size
    code, out, _ = run(capsys, "evaluate", str(dsq), "--model-code", ref, "--data", "digits", "--no-latency", "--json")
    assert abs(json.loads(out)["accuracy"] - result["accuracy"]) <= 0.01
    assert list(tmp_path.iterdir()) == [dsq]


def test_a_program_the_runtime_cannot_initialise_is_one_line_and_no_file(tmp_path, digits):
    """XNNPACK's partitioner took a residual add between two static int8 convolutions as a quantized add that its
    runtime then refused (``xnn_status_invalid_parameter``): the export printed a traceback."""
    from deepsqueeze.recipes import compress, load_recipe

    ref = "py:deepsqueeze.testing.models:TinyResNet"
    compress(ref, load_recipe("int8-static"), tmp_path / "r.dsq", "digits", progress=False, evaluate_result=False)
    model = load(tmp_path / "r.dsq", model=ref)
    try:
        export(model, "pte", tmp_path / "r.pte")
    except ModelError as exc:
        assert "cannot initialise this program" in str(exc) and "\n" not in str(exc)
        assert not (tmp_path / "r.pte").exists()
    else:  # a later ExecuTorch that initialises it: then the program was verified like any other
        assert (tmp_path / "r.pte").is_file()


def test_commands_on_hugging_face_models_print_no_library_log_lines(tmp_path):
    """The pte extra installs torchao, which transformers then imports: every command on a Hugging Face model
    printed torchao's native-library failures and torch's deprecation lines on stderr."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from deepsqueeze.testing.hf_models import make_hf_dir

    folder = make_hf_dir("bert", tmp_path / "bert")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "deepsqueeze", "inspect", f"hf:{folder}"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert "Failed to load" not in done.stderr and "_pytree" not in done.stderr, done.stderr[-500:]

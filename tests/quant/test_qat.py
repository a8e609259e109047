import copy

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core import config_from_dict, config_to_dict
from deepsqueeze.errors import RecipeError
from deepsqueeze.quant import (
    Int8Conv2d,
    Int8Linear,
    PackedIntConv2d,
    PackedIntLinear,
    QuantizeConfig,
    convert_qat_,
    prepare_qat_,
    quantize_,
    train_qat,
)
from deepsqueeze.quant.fake_quant import FakeQuantConv2d, FakeQuantLinear
from deepsqueeze.testing.quant_models import TinyBNConvNet, tiny_bn_convnet_handle


def _qat(bits=4, **options):
    fields = {"epochs": 1, "lr": 2e-3, "limit": 512, "batch_size": 64, **options}
    return QuantizeConfig(method="qat", bits=bits, activations="per_tensor", qat=fields)


def _calib(digits, n=256):
    return [x for x, _ in digits.batches("train", 64, limit=n)]


def _outputs(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


@pytest.fixture(scope="module")
def trained(digits):
    """TinyBNConvNet on digits, W4A8 QAT for one short epoch: (fake-quant model, converted model, handle)."""
    model = tiny_bn_convnet_handle()
    config = _qat(4, freeze_bn_after=0.5)
    prepare_qat_(model.module, config, _calib(digits))
    init = {n: p.detach().clone() for n, p in model.module.named_parameters() if n.endswith("scale")}
    train_qat(model, config, digits, progress=False)
    fake = copy.deepcopy(model.module)
    convert_qat_(model.module, config)
    return fake, model, init


def test_converted_integer_model_agrees_with_its_fake_quant_model(trained, digits):
    fake, model, _ = trained
    x = digits.test_x
    y_fake, y_int = _outputs(fake, x), _outputs(model.module, x)
    agree = (y_fake.argmax(1) == y_int.argmax(1)).float().mean().item()
    assert agree >= 0.999
    # same codes and scales: differences come only from the kernels' own rounding of x / scale at ties
    diff, top = (y_fake - y_int).abs(), y_fake.abs().max()
    # (0.990 of outputs within 1e-4 on an Intel AVX-512/AMX CPU, where fbgemm's x86 kernels round otherwise
    # than on AVX2; the agreement of the labels above and the bound below are what the codes guarantee)
    assert (diff <= 1e-4 * top).float().mean() >= 0.98
    assert diff.max() < 0.05 * top
    kinds = {type(m) for m in model.module.modules()}
    assert Int8Conv2d in kinds and Int8Linear in kinds
    assert not any(isinstance(m, (FakeQuantConv2d, FakeQuantLinear, nn.BatchNorm2d)) for m in model.module.modules())


def test_step_sizes_learn_and_batchnorm_freezes(trained):
    fake, _, init = trained
    learned = {n: p for n, p in fake.named_parameters() if n.endswith("scale")}
    assert learned and any(not torch.equal(learned[n], init[n]) for n in init)
    convs = [m for m in fake.modules() if isinstance(m, FakeQuantConv2d)]
    assert all(c.bn_frozen for c in convs)
    before = convs[0].bn.running_mean.clone()
    fake.train()
    fake(torch.randn(8, 1, 8, 8))
    assert torch.equal(convs[0].bn.running_mean, before)


def test_qat_artifact_round_trips_and_stores_narrow_int8_weights_at_their_width(trained, digits, tmp_path):
    _, model, _ = trained
    size = save(model, tmp_path / "q.dsq")
    loaded = load(tmp_path / "q.dsq", model="py:deepsqueeze.testing.quant_models:TinyBNConvNet")
    x = digits.test_x[:64]
    assert torch.equal(_outputs(loaded.module, x), _outputs(model.module, x))
    conv = dict(loaded.module.named_modules())["3"]
    assert isinstance(conv, Int8Conv2d) and -8 <= int(conv.weight.min()) and int(conv.weight.max()) <= 7  # 4-bit
    assert save(loaded, tmp_path / "again.dsq") == size
    assert (tmp_path / "again.dsq").read_bytes() == (tmp_path / "q.dsq").read_bytes()


def test_gradients_reach_weights_and_every_quantizer(digits):
    module = TinyBNConvNet()
    prepare_qat_(module, _qat(4, act_quantizer="pact"), _calib(digits, 128))
    module.train()
    x, y = next(digits.batches("train", 64))
    nn.functional.cross_entropy(module(x), y).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    for name in ("0.weight", "3.weight", "8.weight", "0.weight_quant.scale", "3.input_quant.alpha",
                 "8.input_quant.alpha"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("weights, flags", [("binary", {"binary": True}), ("ternary", {"bits": 2}),
                                            ("ttq", {"bits": 2})])
def test_binary_and_ternary_weight_only_convert_to_the_ptq_packed_modules(digits, weights, flags, tmp_path):
    model = tiny_bn_convnet_handle()
    module = model.module
    config = _qat(4, weights=weights, act_bits=None)
    prepare_qat_(module, config)
    x = digits.test_x[:128]
    y_fake = _outputs(module, x)
    convert_qat_(module, config)
    assert torch.allclose(_outputs(module, x), y_fake, atol=1e-5)
    layers = dict(module.named_modules())
    first, middle, last = layers["0"], layers["3"], layers["8"]
    assert isinstance(middle, PackedIntConv2d) and all(getattr(middle, k) == v for k, v in flags.items())
    assert isinstance(first, PackedIntConv2d) and first.bits == 8 and not first.binary  # first/last 8-bit
    assert isinstance(last, PackedIntLinear) and last.bits == 8
    if weights == "ttq":
        from deepsqueeze.runtime import PackedTernaryConv2d

        assert isinstance(middle, PackedTernaryConv2d)
        assert not torch.equal(middle.scale, middle.neg_scale)  # learned apart: here initialised apart
    save(model, tmp_path / "t.dsq")
    assert torch.equal(_outputs(load(tmp_path / "t.dsq", model="py:deepsqueeze.testing.quant_models:TinyBNConvNet").module, x), _outputs(module, x))


def test_mixed_precision_qat_takes_widths_from_the_allocator(digits, tmp_path):
    from deepsqueeze.recipes import compress, parse_recipe

    stage = {"type": "quantize", "method": "qat", "bits": 8, "avg_bits": 5.0, "activations": "per_tensor",
             "calibration_samples": 128,
             "qat": {"act_bits": None, "epochs": 0.1, "limit": 256, "batch_size": 64, "first_last_bits": None}}
    recipe = parse_recipe({"data": "digits", "stages": [stage]})
    result = compress("py:deepsqueeze.testing.quant_models:TinyBNConvNet", recipe, tmp_path / "m.dsq",
                      progress=False)
    widths = result.stage_reports[0]["bits_per_layer"]
    assert set(widths) == {"0", "3", "8"} and len(set(widths.values())) > 1
    layers = dict(load(tmp_path / "m.dsq", model="py:deepsqueeze.testing.quant_models:TinyBNConvNet").module.named_modules())
    assert {n: layers[n].bits for n in widths} == widths


def test_quantize_verb_runs_one_explicit_step(digits):
    module = TinyBNConvNet()
    prepare = _qat(8, step="prepare")
    assert quantize_(module, prepare, _calib(digits, 128)) == ["0", "3", "8"]
    assert isinstance(module[0], FakeQuantConv2d) and module[0].weight.requires_grad
    with pytest.raises(RecipeError, match="already prepared"):
        quantize_(module, prepare, _calib(digits, 64))
    quantize_(module, _qat(8, step="convert"))
    assert isinstance(module[0], Int8Conv2d)
    with pytest.raises(RecipeError, match="one QAT step"):
        quantize_(TinyBNConvNet(), _qat(8), _calib(digits, 64))


def test_qat_configs_round_trip_and_reject_bad_options():
    config = _qat(2, weights="ternary", act_quantizer="pact", distill=0.5, first_last_bits=None)
    assert config_from_dict(config_to_dict(config)) == config
    assert config_to_dict(config)["qat"]["weights"] == "ternary"
    with pytest.raises(RecipeError, match="act_bits"):
        QuantizeConfig(method="qat", qat={"act_bits": 4})
    with pytest.raises(RecipeError, match="weight-only QAT"):
        QuantizeConfig(method="qat", group_size=32)
    with pytest.raises(RecipeError, match="method qat"):
        QuantizeConfig(method="rtn", qat={})
    with pytest.raises(RecipeError, match="distill > 0"):
        QuantizeConfig(method="qat", qat={"augment": 2})
    per_layer = QuantizeConfig(method="qat", bits=4, overrides={"conv*": 8}, qat={"augment": 2, "distill": 1.0})
    assert config_from_dict(config_to_dict(per_layer)) == per_layer


def test_gptq_initialised_qat_starts_exactly_where_gptq_ends():
    from deepsqueeze.quant.gptq import dequantized_linear, gptq_model_
    from deepsqueeze.testing.block_models import TinyBlockNet, tiny_block_batches

    batches = tiny_block_batches(2)
    reference = TinyBlockNet()
    gptq_model_(reference, batches, bits=4, group_size=16, build=dequantized_linear)
    module = TinyBlockNet()
    config = QuantizeConfig(method="qat", bits=4, group_size=16, symmetric=False, embeddings=False,
                            qat={"act_bits": None, "init": "gptq", "first_last_bits": None})
    prepare_qat_(module, config, batches)
    x = batches[0]
    assert torch.allclose(_outputs(module, x), _outputs(reference, x), atol=1e-5)
    convert_qat_(module, config)
    assert isinstance(module.blocks[0].query, PackedIntLinear) and module.blocks[0].query.group_size == 16
    assert torch.allclose(_outputs(module, x), _outputs(reference, x), atol=1e-5)


def test_embedding_tables_take_their_codes_at_prepare_so_training_sees_them():
    """The word-embedding table is rounded once, before training: the fake-quant model trains against the
    rounding error it will ship with, and convert gives exactly the model training saw."""
    from deepsqueeze.quant import PackedIntEmbedding
    from deepsqueeze.testing.block_models import TinyBlockNet, tiny_block_batches

    batches = tiny_block_batches(2)
    module = TinyBlockNet()
    config = QuantizeConfig(method="qat", bits=4, group_size=16, symmetric=False,
                            qat={"act_bits": None, "init": "gptq", "first_last_bits": None})
    names = prepare_qat_(module, config, batches)
    assert isinstance(module.embed, PackedIntEmbedding) and module.embed.bits == 4 and "embed" in names
    x = batches[0]
    before = _outputs(module, x)
    convert_qat_(module, config)
    assert torch.allclose(_outputs(module, x), before, atol=1e-5)


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_sentence_encoder_qat_closes_part_of_the_gap_ptq_leaves(distill, tmp_path):
    """Weight-only 2-bit QAT of a tiny BERT encoder, embedding cosine (distill 0) or plus every layer's hidden
    states (distill 1, the distill stage's TinyBERT loss): held-out sentences end closer to the fp32 model
    than right after prepare (where PTQ leaves them), and the converted model round-trips its .dsq."""
    from deepsqueeze.core.calibrate import calibration_batches
    from deepsqueeze.data.datasets import TextData
    from deepsqueeze.quant.qat import qat_model_
    from tests.distill.test_distill import SENTENCES, TINY_BERT, _tiny_bert_model

    model = _tiny_bert_model()
    reference = copy.deepcopy(model)
    held_out = [s.replace("The", "A") for s in SENTENCES[:8]]

    def gap(module: nn.Module) -> float:
        with torch.no_grad():
            return 1 - nn.functional.cosine_similarity(module.encode(held_out),
                                                       reference.module.encode(held_out)).mean().item()

    data = TextData("toy", SENTENCES)
    config = QuantizeConfig(method="qat", bits=2, symmetric=False, embedding_bits=8,
                            qat={"act_bits": None, "first_last_bits": None, "epochs": 3, "lr": 1e-4,
                                 "batch_size": 16, "distill": distill, "schedule": "constant"})
    batches = calibration_batches(model, data, samples=32)
    prepared = copy.deepcopy(model)
    prepare_qat_(prepared.module, config, batches)
    before = gap(prepared.module)
    qat_model_(model, config, data, batches, reference=reference, progress=False)
    after = gap(model.module)
    assert after < 0.7 * before, (before, after)
    assert isinstance(model.module.transformer.encoder.layer[0].attention.self.query, PackedIntLinear)
    batch = model.module.tokenize(held_out)
    save(model, tmp_path / "q.dsq")
    assert torch.equal(load(tmp_path / "q.dsq", model=TINY_BERT).module(**batch), model.module(**batch))


@pytest.mark.parametrize("gamma, var", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_batchnorm_folding_with_zero_scale_or_variance_stays_finite(digits, gamma, var):
    """Issue 24 finding 9: a BatchNorm channel with gamma 0 made the training-time fold divide by zero."""
    module = TinyBNConvNet()
    bn = module[1]
    with torch.no_grad():
        bn.weight[0] = gamma
        bn.running_var[0] = var
    reference = copy.deepcopy(module).eval()
    prepare_qat_(module, _qat(8), _calib(digits, 128))
    x, y = next(digits.batches("train", 64))
    conv = module[0]
    w, b = conv.folded()
    with torch.no_grad():
        unfused = reference[1](reference[0](x))
        fused = nn.functional.conv2d(x, w, b, conv.stride, conv.padding)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    module.train()
    loss = nn.functional.cross_entropy(module(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_a_non_finite_loss_names_the_layer_it_comes_from():
    from deepsqueeze.train.loop import fit

    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        module[1].weight[0, 0] = float("nan")
    batches = lambda epoch: [torch.ones(2, 4)]  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"comes out of 1 \(Linear\)"):
        fit(module, batches, lambda m, x: m(x).sum(), epochs=1, steps_per_epoch=1, progress=False)

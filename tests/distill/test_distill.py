"""Students and the distill stage: layer-dropped transformers, KD of classifiers, .dsq round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.core.config import config_from_dict, config_to_dict
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
from deepsqueeze.data.datasets import TextData
from deepsqueeze.distill import DistillConfig, alternate_layers, distill_, find_layer_stack, keep_layers_
from deepsqueeze.distill.distill import distill_stage
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.eval import accuracy
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle

SENTENCES = [f"The {w} function returns a {v} value for every {u} argument." for w in
             ("open", "close", "read", "write", "seek", "flush") for v in ("new", "cached", "copied", "default")
             for u in ("string", "integer")]

TINY_BERT = "py:deepsqueeze.testing.factor_models:tiny_bert_encoder"


def _tiny_bert_model() -> Model:
    pytest.importorskip("transformers")
    from deepsqueeze.testing.factor_models import tiny_bert_encoder

    try:
        module = tiny_bert_encoder()
    except Exception as exc:  # the tokenizer ships with the MiniLM package
        pytest.skip(f"MiniLM tokenizer unavailable: {exc}")
    return Model(module, py_base(module),
                 Task.SENTENCE_ENCODER, "py:deepsqueeze.testing.factor_models:tiny_bert_encoder",
                 count_params(module))


def test_alternate_layers():
    assert alternate_layers(6, 3) == [1, 3, 5]
    assert alternate_layers(4, 2) == [1, 3]
    assert alternate_layers(6, 6) == list(range(6))
    assert alternate_layers(12, 4) == [2, 5, 8, 11]
    with pytest.raises(RecipeError, match="cannot keep"):
        alternate_layers(3, 4)


def test_keep_layers_is_a_real_smaller_model_that_round_trips(tmp_path):
    model = _tiny_bert_model()
    teacher = copy.deepcopy(model.module)
    assert find_layer_stack(model.module) == "transformer.encoder.layer"
    keep_layers_(model.module, [1, 3])
    layers = model.module.transformer.encoder.layer
    assert len(layers) == 2
    assert torch.equal(layers[0].output.dense.weight, teacher.transformer.encoder.layer[1].output.dense.weight)
    assert count_params(model.module) < count_params(teacher)
    batch = model.module.tokenize(SENTENCES[:5])
    expected = model.module(**batch)
    save(model, tmp_path / "student.dsq")
    loaded = load(tmp_path / "student.dsq", model=TINY_BERT)
    assert len(loaded.module.transformer.encoder.layer) == 2
    assert torch.equal(loaded.module(**batch), expected)
    with pytest.raises(RecipeError, match="increasing"):
        keep_layers_(copy.deepcopy(teacher), [3, 1])


def test_encoder_distillation_with_hidden_and_attention_losses_moves_toward_the_teacher(tmp_path):
    model = _tiny_bert_model()
    teacher = copy.deepcopy(model.module)
    keep_layers_(model.module, alternate_layers(4, 2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a damaged student, so there is something to recover
        for name, p in model.module.transformer.encoder.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    cfg = DistillConfig(epochs=4, lr=3e-3, batch_size=16, schedule="constant", hidden_weight=1.0,
                        attention_weight=1.0)
    held_out = [s.replace("The", "A") for s in SENTENCES[:8]]

    def gap(module: torch.nn.Module) -> float:
        return 1 - torch.nn.functional.cosine_similarity(module.encode(held_out), teacher.encode(held_out)).mean().item()

    before = gap(model.module)
    distill_(model, teacher, cfg, TextData("toy", SENTENCES), progress=False)
    after = gap(model.module)
    assert after < 0.5 * before
    # attention switched back to the default implementation after training
    assert model.module.transformer.config._attn_implementation == teacher.transformer.config._attn_implementation
    batch = model.module.tokenize(held_out)
    expected = model.module(**batch)
    save(model, tmp_path / "d.dsq")
    assert torch.equal(load(tmp_path / "d.dsq", model=TINY_BERT).module(**batch), expected)


def test_keep_layers_student_from_the_config():
    model = _tiny_bert_model()
    teacher = copy.deepcopy(model.module)
    for p in model.module.parameters():  # a frozen copy (regression: distill_ used to refuse to train it)
        p.requires_grad_(False)
    cfg = DistillConfig(student="keep-layers", num_layers=2, epochs=1, lr=1e-3, batch_size=32, hidden_weight=0.5)
    stats = distill_(model, teacher, cfg, TextData("toy", SENTENCES), progress=False)
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher's flags are left alone
    dropouts = [m.p for m in model.module.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.1 for p in dropouts)  # switched off while training, restored after
    assert stats["kept_layers"] == [1, 3] and len(model.module.transformer.encoder.layer) == 2
    assert model.module.transformer.config.num_hidden_layers == 2


def test_classifier_kd_with_a_hint_reaches_the_teacher():
    data = tiny_classification_data()
    teacher = tiny_model_handle()
    from deepsqueeze.train.loop import train_classifier

    train_classifier(teacher.module, data, epochs=3, lr=1e-2, batch_size=64, progress=False)
    torch.manual_seed(1)
    student = tiny_model_handle()
    for p in student.module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cfg = DistillConfig(epochs=3, lr=1e-2, batch_size=64, temperature=2.0, hints=[("fc1", "fc1")],
                        schedule="constant")
    ctx = StageContext(student, data=data, reference=teacher, progress=False)
    distill_stage(student, cfg, ctx)
    assert not hasattr(student.module, "_hint_adapters")
    assert accuracy(student.module, data) >= accuracy(teacher.module, data) - 0.05
    assert ctx.report[-1]["stage"] == "distill"


def test_distill_errors_and_config_round_trip():
    cfg = DistillConfig(student="keep-layers", num_layers=3, hints=[("a", "b")], attention_weight=0.5)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    model = tiny_model_handle()
    with pytest.raises(DataError, match="training data"):
        distill_stage(model, DistillConfig(), StageContext(model, data=None, progress=False))
    with pytest.raises(RecipeError, match="unknown student"):
        distill_(model, copy.deepcopy(model.module), DistillConfig(student="bigger"), tiny_classification_data())
    with pytest.raises(RecipeError, match="hint layer"):
        distill_(model, copy.deepcopy(model.module), DistillConfig(hints=[("nope", "fc1")]),
                 tiny_classification_data(), progress=False)


def test_the_lm_objective_is_the_models_own_next_token_loss_and_only_for_causal_lms(tmp_path):
    """Issue 30: recovery after block removal trains with the LM objective: ``lm_weight`` x next-token
    cross-entropy (equal to transformers' own loss on unpadded text) beside the KL to the teacher."""
    from deepsqueeze.distill.distill import DistillConfig
    from deepsqueeze.errors import RecipeError
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir
    from deepsqueeze.testing.models import tiny_model_handle
    from deepsqueeze.train.losses import next_token_loss

    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    inputs = model.module.tokenize(["one sentence of a few words for the loss"])
    with torch.no_grad():
        out = model.module.transformer(**inputs, labels=inputs["input_ids"])
    ours = next_token_loss(out.logits, inputs["input_ids"], inputs["attention_mask"])
    assert float(ours) == pytest.approx(float(out.loss), rel=1e-5)
    padded = model.module.tokenize(["short", "one sentence of a few words for the loss"])
    with torch.no_grad():
        logits = model.module.transformer(**padded).logits
    assert torch.isfinite(next_token_loss(logits, padded["input_ids"], padded["attention_mask"]))
    DistillConfig(lm_weight=1.0).preflight(model)
    with pytest.raises(RecipeError, match="lm_weight"):
        DistillConfig(lm_weight=1.0).preflight(tiny_model_handle())

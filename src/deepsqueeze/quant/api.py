"""``quantize_``: the in-place verb, the method registry, and the built-in methods.

``quantize_(module, config, calibration_batches)`` replaces the selected layers of ``module`` by integer
representations (:mod:`deepsqueeze.runtime`) and records one replayable ``quant.module`` transform per
replaced layer on ``module`` (the model root), so ``deepsqueeze.load`` rebuilds the same structure.

Methods are functions ``fn(module, config, batches) -> list[str]`` (the names of the replaced layers)
registered with :func:`register_method`; the ``quantize`` stage dispatches on ``config.method``.
A method installs each new layer with :func:`install`, which records the transform for it.

Calibration batches are any iterable of model inputs: a tensor (``module(x)``), a tuple of positional
arguments, a dict of keyword arguments, or a ``CalibBatch`` from :mod:`deepsqueeze.quant.calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any

import pydantic
import torch
from torch import nn

from deepsqueeze.core.coverage import (
    check_unsupported,
    diff_coverage,
    register_planner,
    report_coverage,
    snapshot,
)
from deepsqueeze.core.kinds import conv1d_to_linear, layer_kind, weight_bearing_modules
from deepsqueeze.core.progress import track
from deepsqueeze.core.record import (
    EMPTY,
    EXCLUDED,
    NOT_DIVISIBLE,
    TIED,
    UNSUPPORTED,
    CoverageEntry,
    get_record,
    record_coverage,
    record_transform,
    register_model_check,
    register_transform,
)
from deepsqueeze.core.sharing import tied_weight_groups
from deepsqueeze.core.walker import get_submodule, has_empty_weight, name_matches, set_submodule
from deepsqueeze.errors import ArtifactError, DataError, RecipeError, UnsupportedLayerError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.primitives.observers import Observer, make_observer
from deepsqueeze.quant.config import Method, QuantizeConfig
from deepsqueeze.runtime import (
    CONV_INPUT_BITS,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    PackedInt4Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    PackedTernaryConv2d,
    PackedTernaryLinear,
    PackedWeights,
)

__all__ = ["CLAIMED_KINDS", "METHODS", "MethodFn", "install", "note_skip", "plan_quantize", "quantize_", "register_method",
           "run_batch", "select_layers"]

MethodFn = Callable[[nn.Module, QuantizeConfig, list[Any] | None], list[str]]
METHODS: dict[str, MethodFn] = {}

# Classes the loader may rebuild (by name: nothing is imported from the artifact).
MODULE_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (Int8Linear, Int8Conv2d, PackedIntLinear, PackedInt4Linear, PackedIntConv2d, Int8Embedding,
                PackedIntEmbedding, PackedTernaryLinear, PackedTernaryConv2d)
}
# What else counts as a quantized representation in coverage (besides MODULE_CLASSES): PackedWeights, and
# what methods register (QAT's fake-quant modules, which stand for their integer form until convert).
_EXTRA_REPRESENTATIONS: list[type[nn.Module]] = [PackedWeights]


def register_representation(cls: type[nn.Module]) -> type[nn.Module]:
    """Count modules of ``cls`` as quantized in coverage (a class installed outside MODULE_CLASSES)."""
    if cls not in _EXTRA_REPRESENTATIONS:
        _EXTRA_REPRESENTATIONS.append(cls)
    return cls


def representations() -> tuple[type[nn.Module], ...]:
    """The module classes coverage counts as quantized (read at call time: plug-ins register late)."""
    return (*MODULE_CLASSES.values(), *_EXTRA_REPRESENTATIONS)


# Layer kinds (deepsqueeze.core.kinds) each method handles. Linear-like kinds go through the method's own
# kernels; GENERIC_KINDS (and conv2d for the dynamic methods) get PackedWeights codes after the method ran.
LINEAR_KINDS = frozenset({"linear", "hf-conv1d"})
GENERIC_KINDS = frozenset({"conv1d", "conv3d", "conv-transpose1d", "conv-transpose2d", "lstm", "gru", "rnn",
                           "multihead-attention"})
_ALL_KINDS = LINEAR_KINDS | GENERIC_KINDS | {"conv2d", "embedding"}
CLAIMED_KINDS: dict[str, frozenset[str]] = {
    Method.DYNAMIC.value: _ALL_KINDS, Method.SMOOTHQUANT.value: _ALL_KINDS, Method.STATIC.value: _ALL_KINDS,
    Method.RTN.value: _ALL_KINDS, Method.GPTQ.value: _ALL_KINDS,
    Method.MIXED.value: LINEAR_KINDS | {"conv2d", "embedding"},
    Method.BINARY.value: LINEAR_KINDS | {"conv2d"}, Method.TERNARY.value: LINEAR_KINDS | {"conv2d"},
}
# The kinds the dynamic methods (no conv kernel of their own) also hand to PackedWeights.
_GENERIC_FOR = {Method.DYNAMIC.value: GENERIC_KINDS | {"conv2d"}, Method.SMOOTHQUANT.value: GENERIC_KINDS | {"conv2d"},
                Method.STATIC.value: GENERIC_KINDS, Method.RTN.value: GENERIC_KINDS, Method.GPTQ.value: GENERIC_KINDS}


def register_method(name: str | Method, kinds: Iterable[str] | None = None) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(module, config, batches) -> replaced layer names`` for ``config.method == name``.

    ``kinds`` are the layer kinds (:mod:`deepsqueeze.core.kinds`) the method handles (default: the
    Linear-like kinds); coverage warns about weight-bearing modules of other kinds it leaves float.
    """

    def decorate(fn: MethodFn) -> MethodFn:
        key = str(Method(name).value)
        METHODS[key] = fn
        if kinds is not None or key not in CLAIMED_KINDS:
            CLAIMED_KINDS[key] = frozenset(kinds) if kinds is not None else LINEAR_KINDS
        return fn

    return decorate


def quantize_(module: nn.Module, config: QuantizeConfig, calibration_batches: Iterable[Any] | None = None, *,
              on_unsupported: str = "warn") -> list[str]:
    """Quantize ``module`` in place with ``config``; returns the names of the layers replaced.

    Methods that calibrate (static, smoothquant, gptq) need ``calibration_batches`` (never the
    evaluation split). Every weight-bearing module ends up in the coverage record
    (``get_record(module).coverage``): compressed into which representation, skipped and why, or left
    float. ``on_unsupported`` (``warn``, ``skip``, ``error``) decides what a module of a kind the
    method does not handle causes; ``error`` raises UnsupportedLayerError before anything changes.
    A weight tied to another (GPT-2's ``lm_head``) ends up sharing the other's codes.
    """
    fn = METHODS.get(config.method.value)
    if fn is None:
        raise RecipeError(f"quantize method {config.method.value!r} is not available in this deepsqueeze "
                          f"(available: {', '.join(sorted(METHODS))})")
    check_unsupported(plan_quantize(module, config), on_unsupported)
    batches = list(calibration_batches) if calibration_batches is not None else None
    before = snapshot(module)
    ties = tied_weight_groups(module)
    module.__dict__.pop(_SKIPS, None)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            done = fn(module, config, batches)
            done += _pack_generic(module, config)
            _retie(module, ties)
    finally:
        module.train(was_training)
    reasons = {**_skip_reasons(module, config), **module.__dict__.pop(_SKIPS, {})}
    entries = diff_coverage(module, before, "quantize", CLAIMED_KINDS[config.method.value], reasons,
                            representations())
    record_coverage(module, entries)
    report_coverage(entries, on_unsupported)
    return done


_SKIPS = "_deepsqueeze_quant_skips"


def note_skip(root: nn.Module, name: str, reason: str) -> None:
    """A method tells coverage why it left layer ``name`` of ``root`` float (``reason``: a constant of
    :mod:`deepsqueeze.core.record`, then detail)."""
    root.__dict__.setdefault(_SKIPS, {})[name] = reason


def _skip_reasons(module: nn.Module, config: QuantizeConfig) -> dict[str, str]:
    """Modules the config leaves alone on purpose: include/exclude patterns, ``embeddings: false``."""
    reasons = {}
    for name, _layer, kind in weight_bearing_modules(module):
        if config.include and not name_matches(name, config.include):
            reasons[name] = f"{EXCLUDED}: not in include"
        elif config.exclude and name_matches(name, config.exclude):
            reasons[name] = f"{EXCLUDED}: exclude"
        elif kind is not None and kind.name == "embedding" and not config.embeddings:
            reasons[name] = f"{EXCLUDED}: embeddings: false"
        elif has_empty_weight(_layer):
            reasons[name] = EMPTY
    return reasons


def _predicted(method: str, kind: str) -> str:
    weight_only = method in (Method.RTN.value, Method.GPTQ.value, Method.MIXED.value, Method.BINARY.value,
                             Method.TERNARY.value)
    if kind in _GENERIC_FOR.get(method, ()):
        return "PackedWeights"
    if kind in LINEAR_KINDS:
        return "PackedIntLinear" if weight_only else "Int8Linear"
    if kind == "conv2d":
        return "PackedIntConv2d" if weight_only else "Int8Conv2d"
    if kind == "embedding":
        return "PackedIntEmbedding" if weight_only else "Int8Embedding"
    return "?"


def plan_quantize(module: nn.Module, config: QuantizeConfig) -> list[CoverageEntry]:
    """The coverage :func:`quantize_` will record, from the config and the layer kinds alone (nothing runs).

    Calibrated methods may still leave a module float when the calibration data never reaches it.
    """
    claimed = CLAIMED_KINDS.get(config.method.value, LINEAR_KINDS)
    reasons = _skip_reasons(module, config)
    stage = len(get_record(module).stages)
    entries = []
    for snap in snapshot(module):
        kind = snap.kind or f"other:{type(snap.module).__name__}"
        if snap.name in reasons:
            entries.append(CoverageEntry(stage, "quantize", snap.name, kind, snap.weights, "skipped", None,
                                         reasons[snap.name]))
        elif snap.kind in claimed:
            entries.append(CoverageEntry(stage, "quantize", snap.name, kind, snap.weights, "compressed",
                                         _predicted(config.method.value, snap.kind or ""),
                                         f"{TIED}: {snap.tied_to}" if snap.tied_to else None))
        else:
            entries.append(CoverageEntry(stage, "quantize", snap.name, kind, snap.weights, "float", None, UNSUPPORTED))
    return entries


@register_planner("quantize")
def _plan_stage(module: nn.Module, config: Any, example: Any = None) -> list[CoverageEntry]:
    return plan_quantize(module, config)


def _pack_generic(module: nn.Module, config: QuantizeConfig) -> list[str]:
    """Layer kinds without their own integer module here get their weights as PackedWeights codes."""
    kinds = _GENERIC_FOR.get(config.method.value)
    if not kinds:
        return []
    int8 = config.method.value in (Method.DYNAMIC.value, Method.SMOOTHQUANT.value, Method.STATIC.value)
    bits, group, symmetric = (8, None, True) if int8 else (config.bits, config.group_size, config.symmetric)
    reasons = _skip_reasons(module, config)
    done = []
    for name, layer, kind in list(weight_bearing_modules(module)):
        if kind is None or kind.name not in kinds or name in reasons:
            continue
        new = PackedWeights.from_float(layer, bits if int8 else config.bits_for(name), group, symmetric)
        set_submodule(module, name, new)
        record_transform(module, "quant.packed_weights", name, **new.replay_params())
        done.append(name)
    return done


def _retie(root: nn.Module, groups: list[list[tuple[str, str]]]) -> None:
    """Modules that shared one float weight share the equal tensors of their quantized representations."""
    for places in groups:
        mods = []
        for mod_name, _ in places:
            try:
                mods.append(get_submodule(root, mod_name))
            except AttributeError:
                continue
        if len(mods) < 2 or not isinstance(mods[0], representations()):
            continue
        pool = [b for b in mods[0].buffers() if b is not None]
        for other in mods[1:]:
            if not isinstance(other, representations()) or other is mods[0]:
                continue
            for sub in other.modules():
                for attr, buf in list(sub._buffers.items()):
                    if buf is None:
                        continue
                    match = next((b for b in pool if b.shape == buf.shape and b.dtype == buf.dtype
                                  and torch.equal(b, buf)), None)
                    if match is not None:
                        sub._buffers[attr] = match
                        if hasattr(sub, "_cache"):
                            sub._cache.clear()


def install(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` (a representation from :mod:`deepsqueeze.runtime`) at ``name`` and record its replay."""
    cls = type(new).__name__
    if cls not in MODULE_CLASSES:
        raise TypeError(f"{cls} is not a replayable quantized module")
    set_submodule(root, name, new)
    record_transform(root, "quant.module", name, cls=cls, **new.replay_params())  # type: ignore[operator]


def _install_identity(root: nn.Module, name: str) -> None:
    set_submodule(root, name, nn.Identity())
    record_transform(root, "quant.identity", name)


# Geometry a quantized module must share with the float module it replaces (checked at replay, so a
# forged manifest can neither allocate beyond the base model nor build a layer whose forward fails).
_GEOMETRY = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
             "dilation", "groups", "num_embeddings", "embedding_dim", "padding_idx")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class QuantModuleParams(pydantic.BaseModel):
    """``quant.module`` params: the representation's class and its constructor arguments (checked
    against the replaced module's geometry by the replay)."""

    model_config = pydantic.ConfigDict(extra="allow")
    cls: Annotated[str, pydantic.Strict(), pydantic.Field(max_length=64)]
    bits: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=8)] | None = None
    group_size: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 31)] | None = None
    bias: Annotated[bool, pydantic.Strict()] | None = None

    @pydantic.field_validator("cls")
    @classmethod
    def _registered(cls, value: str) -> str:  # the registry, not a list frozen at import: plug-ins add to it
        if value not in MODULE_CLASSES:
            raise ValueError(f"unknown quantized module class (known: {', '.join(sorted(MODULE_CLASSES))})")
        return value


@register_transform("quant.module", params=QuantModuleParams)
def _replay_module(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    params = dict(params)
    cls = MODULE_CLASSES.get(params.pop("cls", None))  # type: ignore[arg-type]
    if cls is None:
        raise ArtifactError(f"unknown quantized module class for {target}: upgrade deepsqueeze")
    old = get_submodule(root, target)
    for key in _GEOMETRY:
        if key in params and _plain(getattr(old, key, None)) != params[key]:
            raise ArtifactError(f"{cls.__name__} with {key}={str(params[key])[:40]} cannot replace "
                                f"{type(old).__name__} {target!r} ({key}={_plain(getattr(old, key, None))})")
    if not any(key in params for key in _GEOMETRY):
        raise ArtifactError(f"quant.module params for {target!r} name no geometry")
    set_submodule(root, target, cls(**params))


class _PackedSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    shape: Annotated[list[Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 40)]],
                     pydantic.Field(min_length=1, max_length=8)]
    bits: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=8)]
    group_size: Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=1 << 31)] | None = None


class PackedWeightsParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    specs: Annotated[dict[Annotated[str, pydantic.Field(max_length=1024)], _PackedSpec], pydantic.Field(min_length=1)]


@register_transform("quant.packed_weights", params=PackedWeightsParams)
def _replay_packed_weights(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    specs = params.get("specs")
    if not isinstance(specs, dict):
        raise ArtifactError(f"malformed quant.packed_weights transform for {target}")
    inner = get_submodule(root, target)
    for name, spec in specs.items():
        path, _, attr = name.rpartition(".")
        weight = getattr(inner.get_submodule(path) if path else inner, attr, None)
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != spec["shape"]:
            raise ArtifactError(f"packed weight {name!r} of {target!r} does not match the module's tensor")
    set_submodule(root, target, PackedWeights(inner, specs))


@register_transform("quant.as_linear")
def _replay_as_linear(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    set_submodule(root, target, conv1d_to_linear(get_submodule(root, target)))


@register_transform("quant.identity")
def _replay_identity(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    set_submodule(root, target, nn.Identity())


def run_calibration(module: nn.Module, batches: Iterable[Any], handles: list[Any]) -> None:
    """Run every calibration batch through ``module``, then remove the observing hooks ``handles``."""
    batches = list(batches)
    try:
        with track("calibrating activation ranges", len(batches), "batches") as bar:
            for batch in batches:
                run_batch(module, batch)
                bar.advance()
    finally:
        for handle in handles:
            handle.remove()


def run_batch(module: nn.Module, batch: Any) -> Any:
    """Call ``module`` on one calibration batch (tensor, tuple of args, dict of kwargs or CalibBatch)."""
    if isinstance(batch, torch.Tensor):
        return module(batch)
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    args, kwargs = getattr(batch, "args", None), getattr(batch, "kwargs", None)
    if args is None or kwargs is None:
        raise DataError(f"cannot feed a calibration batch of type {type(batch).__name__} to the model")
    return module(*args, **kwargs)


def _need_batches(config: QuantizeConfig, batches: list[Any] | None) -> list[Any]:
    if not batches:
        raise DataError(f"quantize method {config.method.value} calibrates on data: pass calibration batches "
                        "(recipes: --data, e.g. fashion-mnist or pydoc-sentences:calib)")
    return batches


def select_layers(module: nn.Module, config: QuantizeConfig,
                  types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """Layers of ``types`` matching the config's include/exclude patterns (embeddings only if enabled).

    When ``nn.Linear`` is asked for, transformers' ``Conv1D`` (a transposed Linear: GPT-2's ``c_attn``,
    ``c_proj``, ``c_fc``) is selected too, turned into the equal ``nn.Linear`` (a recorded transform).
    Layers inside a module that runs them itself (``nn.MultiheadAttention``'s ``out_proj``) are left
    to that module's handler.
    """
    if not config.embeddings:
        types = tuple(t for t in types if t is not nn.Embedding)
    owners = [name + "." for name, _, kind in weight_bearing_modules(module) if kind is not None and kind.owns_children]
    out = []
    for name, layer in list(module.named_modules()):
        if not name or any(name.startswith(o) for o in owners) or has_empty_weight(layer):
            continue
        if config.include and not name_matches(name, config.include):
            continue
        if config.exclude and name_matches(name, config.exclude):
            continue
        kind = layer_kind(layer)
        if not isinstance(layer, types):
            if nn.Linear not in types or kind is None or kind.name != "hf-conv1d":
                continue
            layer = conv1d_to_linear(layer)
            set_submodule(module, name, layer)
            record_transform(module, "quant.as_linear", name)
        out.append((name, layer))
    return out


def _activation_qparams(observer: Observer, bits: int = 8) -> tuple[float, float]:
    qp = observer.qparams(bits, symmetric=False, signed=False)
    return float(qp.scale), float(qp.zero_point)


def _new_observer(config: QuantizeConfig) -> Observer:
    return make_observer(config.observer.value, 8, symmetric=False, signed=False, percentile=config.percentile)


# ------------------------------------------------------------------------------------------ methods


@register_method(Method.DYNAMIC)
def _dynamic(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    done = []
    for name, layer in select_layers(module, config, (nn.Linear, nn.Embedding)):
        if isinstance(layer, nn.Linear):
            install(module, name, Int8Linear.from_float(layer, config.activations.value))
        else:
            install(module, name, Int8Embedding.from_float(layer))
        done.append(name)
    return done


@register_method(Method.SMOOTHQUANT)
def _smoothquant(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    """SmoothQuant: per input channel j, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; X/s and W*s."""
    batches = _need_batches(config, batches)
    linears = [(n, m) for n, m in select_layers(module, config, (nn.Linear,))]
    amax: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in linears:
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)

        handles.append(layer.register_forward_pre_hook(hook))
    run_calibration(module, batches, handles)
    done = []
    for name, layer in linears:
        x_max = amax.get(name)
        if x_max is None:
            continue  # never ran during calibration: leave it in float
        w_max = layer.weight.detach().abs().amax(0).float()
        s = x_max.clamp_min(1e-5).pow(config.alpha) / w_max.clamp_min(1e-5).pow(1 - config.alpha)
        s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
        install(module, name, Int8Linear.from_float(layer, config.activations.value, smooth=s))
        done.append(name)
    for name, layer in select_layers(module, config, (nn.Embedding,)):
        install(module, name, Int8Embedding.from_float(layer))
        done.append(name)
    return done


def _fold_batchnorm(module: nn.Module, conv_names: set[str]) -> None:
    """Fold each BatchNorm2d that directly follows a target Conv2d in a Sequential into the conv."""
    for seq_name, seq in list(module.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:], strict=False):
            full = f"{seq_name}.{cname}" if seq_name else cname
            if full not in conv_names or not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d):
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue
            factor = (bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
                bn.running_var + bn.eps)
            shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.data = conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
            _install_identity(module, f"{seq_name}.{bname}" if seq_name else bname)


def _following_relu(module: nn.Module, conv_names: set[str]) -> dict[str, str]:
    """Target conv name -> name of the ReLU that directly follows it in a Sequential (after BN folding)."""
    out = {}
    for seq_name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [(n, c) for n, c in seq.named_children() if not isinstance(c, nn.Identity)]
        for (cname, _), (rname, relu) in zip(children, children[1:], strict=False):
            full = f"{seq_name}.{cname}" if seq_name else cname
            if full in conv_names and isinstance(relu, nn.ReLU):
                out[full] = f"{seq_name}.{rname}" if seq_name else rname
    return out


# Modules and calls that run on quantized tensors unchanged (the codes keep their scale and zero point).
_QUANTIZED_PASSTHROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.Flatten, nn.Identity,
                          nn.Dropout, nn.Unflatten)
_QUANTIZED_PASSTHROUGH_CALLS = {torch.flatten, torch.reshape, "flatten", "view", "reshape", "contiguous"}


def _integer_fed(module: nn.Module, convs: set[str], integer_layers: set[str]) -> set[str]:
    """The convs in ``convs`` whose every consumer is an integer layer (through pooling and flattening).

    Their outputs can stay quantized tensors. Found on the torch.fx graph; a model fx cannot trace
    keeps float boundaries between layers (correct, only slower).
    """
    if not convs:
        return set()
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - any tracing failure only disables the optimisation
        return set()
    modules = dict(module.named_modules())

    def only_integer_users(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in integer_layers:
                continue
            passthrough = (user.op == "call_module" and isinstance(modules.get(str(user.target)), _QUANTIZED_PASSTHROUGH)
                           or user.op in ("call_function", "call_method") and user.target in _QUANTIZED_PASSTHROUGH_CALLS)
            if not passthrough or user.args[0] is not node or not only_integer_users(user):
                return False
        return bool(node.users)

    return {str(n.target) for n in graph.nodes if n.op == "call_module" and n.target in convs and only_integer_users(n)}


@register_method(Method.STATIC)
def _static(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    batches = _need_batches(config, batches)
    layers = select_layers(module, config, (nn.Linear, nn.Conv2d))
    conv_names = {n for n, m in layers if isinstance(m, nn.Conv2d)}
    _fold_batchnorm(module, conv_names)
    relus = _following_relu(module, conv_names)
    observers_in: dict[str, Observer] = {}
    observers_out: dict[str, Observer] = {}
    handles = []
    for name, layer in layers:
        observers_in[name] = _new_observer(config)
        handles.append(layer.register_forward_pre_hook(
            lambda _m, args, obs=observers_in[name]: obs.update(args[0])))
        if name in conv_names:
            observers_out[name] = _new_observer(config)
            fuse = name in relus

            def out_hook(_m: nn.Module, _a: tuple, out: torch.Tensor, obs: Observer = observers_out[name],
                         fuse: bool = fuse) -> None:
                obs.update(torch.relu(out) if fuse else out)

            handles.append(layer.register_forward_hook(out_hook))
    run_calibration(module, batches, handles)
    integer = {name for name, _ in layers if observers_in[name].seen > 0}  # others were not reached: keep float
    for conv, relu in relus.items():
        if conv in integer:
            _install_identity(module, relu)  # the fused Int8Conv2d below applies it
    chained = _integer_fed(module, conv_names & integer, integer)
    done = []
    for name, layer in layers:
        if name not in integer:
            continue
        qin = _activation_qparams(observers_in[name], CONV_INPUT_BITS)
        if isinstance(layer, nn.Conv2d):
            out_bits = CONV_INPUT_BITS if name in chained else 8
            new: nn.Module = Int8Conv2d.from_float(layer, qin, _activation_qparams(observers_out[name], out_bits),
                                                   relu=name in relus, quantized_output=name in chained)
            install(module, name, new)
        else:
            install(module, name, Int8Linear.from_float(layer, "static", input_qparams=qin))
        done.append(name)
    for name, layer in select_layers(module, config, (nn.Embedding,)):
        install(module, name, Int8Embedding.from_float(layer))
        done.append(name)
    return done


@register_method(Method.RTN)
def _rtn(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    done = []
    for name, layer in select_layers(module, config, (nn.Linear, nn.Conv2d, nn.Embedding)):
        new: nn.Module
        row = layer.in_features if isinstance(layer, nn.Linear) else layer.embedding_dim \
            if isinstance(layer, nn.Embedding) else None
        group = config.group_size
        if row is not None and group is not None and row % group:
            note_skip(module, name, f"{NOT_DIVISIBLE}: group {group} does not divide {row}, one scale per row")
            group = None
        try:
            if isinstance(layer, nn.Linear):
                new = PackedIntLinear.from_float(layer, config.bits_for(name), group, config.symmetric)
            elif isinstance(layer, nn.Conv2d):
                new = PackedIntConv2d.from_float(layer, config.bits_for(name),
                                                 _conv_group(layer, config.group_size), config.symmetric)
            else:
                new = PackedIntEmbedding.from_float(layer, config.bits_for(name, config.embedding_bits), group,
                                                    config.symmetric)
        except ValueError as exc:
            note_skip(module, name, f"{NOT_DIVISIBLE}: {exc}")
            continue
        install(module, name, new)
        done.append(name)
    return done


def _conv_group(conv: nn.Conv2d, group_size: int | None) -> int | None:
    """A conv row is ``in/groups*kh*kw`` long: fall back to per channel when the group does not divide it."""
    row = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return group_size if group_size is not None and row % group_size == 0 else None


def _levels(module: nn.Module, config: QuantizeConfig, ternary: bool) -> list[str]:
    done = []
    for name, layer in select_layers(module, config, (nn.Linear, nn.Conv2d)):
        if isinstance(layer, nn.Linear):
            new: PackedIntLinear | PackedIntConv2d = PackedIntLinear(
                layer.in_features, layer.out_features, 2, None, layer.bias is not None, binary=not ternary)
        else:
            if not isinstance(layer.padding, tuple):
                raise UnsupportedLayerError(f"{name}: string padding is not supported; exclude it")
            new = PackedIntConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                                  layer.stride, layer.padding, layer.dilation, layer.groups,  # type: ignore[arg-type]
                                  layer.bias is not None, 2, None, binary=not ternary)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        if ternary:
            codes, scale = Q.ternarize(w, axis=0)
            zero = torch.ones(w.shape[0], 1, dtype=torch.uint8)
            new.set_codes((codes + 1).to(torch.uint8), scale[:, None], zero)
        else:
            new.quantize_weight(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach().float())
        install(module, name, new)
        done.append(name)
    return done


@register_method(Method.BINARY)
def _binary(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    return _levels(module, config, ternary=False)


@register_method(Method.TERNARY)
def _ternary(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    return _levels(module, config, ternary=True)


@register_model_check
def _quantization_parameters_in_range(root: nn.Module) -> str | None:
    """Stored scales finite and non-negative (activation scales positive), zero points within uint8:
    what a forged artifact could otherwise hand to the quantized kernels, whose forward would fail."""
    for name, module in root.named_modules():
        if not isinstance(module, representations()):
            continue
        for bname, buf in module.named_buffers():
            if buf is None or not buf.numel():
                continue
            where = f"{name}.{bname}" if name else bname
            if bname.endswith("scale") and buf.is_floating_point():
                if not bool(torch.isfinite(buf).all()) or bool((buf < 0).any()):
                    return f"{where} holds negative or non-finite scales"
                if bname.rsplit(".", 1)[-1] in ("input_scale", "output_scale") and bool((buf <= 0).any()):
                    return f"{where} holds a zero activation scale"
            if bname.endswith("zero_point") and (bool((buf < 0).any()) or bool((buf > 255).any())
                                                 or (buf.is_floating_point() and not bool(torch.isfinite(buf).all()))):
                return f"{where} holds zero points outside 0..255"
    return None

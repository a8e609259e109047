"""``quantize_``: the in-place verb, the method registry, coverage, and what every method shares.

``quantize_(module, config, calibration_batches)`` replaces the selected layers of ``module`` by integer
representations (:mod:`deepsqueeze.runtime`) and records one replayable ``quant.module`` transform per
replaced layer on ``module`` (the model root), so ``deepsqueeze.load`` rebuilds the same structure.

Methods are functions ``fn(module, config, batches) -> list[str]`` (the names of the replaced layers)
registered with :func:`register_method`; the ``quantize`` stage dispatches on ``config.method``.
A method installs each new layer with :func:`install`, which records the transform for it. The built-in
methods are in :mod:`deepsqueeze.quant.methods`, the loader's replays of what they record in
:mod:`deepsqueeze.quant.replay`.

Calibration batches are any iterable of model inputs: a tensor (``module(x)``), a tuple of positional
arguments, a dict of keyword arguments, or a ``CalibBatch`` from :mod:`deepsqueeze.core.calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from deepsqueeze import runtime
from deepsqueeze.core.coverage import (
    check_unsupported,
    diff_coverage,
    register_planner,
    report_coverage,
    snapshot,
)
from deepsqueeze.core.kinds import as_linear_, layer_kind, weight_bearing_modules
from deepsqueeze.core.progress import track
from deepsqueeze.core.record import (
    EMPTY,
    EXCLUDED,
    TIED,
    UNSUPPORTED,
    CoverageEntry,
    get_record,
    record_coverage,
    record_transform,
)
from deepsqueeze.core.sharing import tied_weight_groups
from deepsqueeze.core.walker import get_submodule, has_empty_weight, name_matches, set_submodule
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.quant.config import Method, QuantizeConfig

__all__ = ["CLAIMED_KINDS", "METHODS", "MethodFn", "install", "note_skip", "plan_quantize", "quantize_", "register_method",
           "run_batch", "select_layers"]

MethodFn = Callable[[nn.Module, QuantizeConfig, list[Any] | None], list[str]]
METHODS: dict[str, MethodFn] = {}

# Classes the loader may rebuild (by name: nothing is imported from the artifact).
MODULE_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (runtime.Int8Linear, runtime.Int8Conv2d, runtime.PackedIntLinear, runtime.PackedInt4Linear,
                runtime.PackedIntConv2d, runtime.Int8Embedding, runtime.PackedIntEmbedding, runtime.PackedTernaryLinear,
                runtime.PackedTernaryConv2d)
}
# What else counts as a quantized representation in coverage (besides MODULE_CLASSES): PackedWeights, and
# what methods register (QAT's fake-quant modules, which stand for their integer form until convert).
_EXTRA_REPRESENTATIONS: list[type[nn.Module]] = [runtime.PackedWeights]


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
        new = runtime.PackedWeights.from_float(layer, bits if int8 else config.bits_for(name), group, symmetric)
        set_submodule(module, name, new)
        record_transform(module, "quant.packed_weights", name, **new.replay_params())
        done.append(name)
    return done


def _retie(root: nn.Module, groups: list[list[tuple[str, str]]]) -> None:
    """Modules that shared one float weight share the equal tensors of their quantized representations; a
    Linear tied to a quantized embedding table (an LM head) computes with the table's own codes."""
    for places in groups:
        named = []
        for mod_name, _ in places:
            try:
                named.append((mod_name, get_submodule(root, mod_name)))
            except AttributeError:
                continue
        if len(named) < 2 or not isinstance(named[0][1], representations()):
            continue
        if isinstance(named[0][1], runtime.PackedIntEmbedding):
            for i, (name, other) in enumerate(named[1:], 1):
                if isinstance(other, (nn.Linear, runtime.PackedIntLinear)):
                    head = runtime.PackedIntLinear.sharing_codes(named[0][1], other.bias)
                    install(root, name, head)
                    named[i] = (name, head)
        mods = [m for _, m in named]
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
            layer = as_linear_(module, name)
        out.append((name, layer))
    return out

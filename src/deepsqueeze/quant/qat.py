"""Quantization-aware training (QAT) in three explicit steps, as torchao does it: prepare -> train -> convert.

    from deepsqueeze.quant import QuantizeConfig, prepare_qat_, train_qat, convert_qat_
    config = QuantizeConfig(method="qat", bits=4, qat={"act_bits": 8, "epochs": 2})
    prepare_qat_(model.module, config, calibration_batches)   # fake-quant modules, initialised from PTQ
    train_qat(model, config, data)                            # the one training loop (deepsqueeze.train)
    convert_qat_(model.module)                                # Int8Linear / Int8Conv2d / packed modules

or one recipe stage ``{type: quantize, method: qat, ...}`` (``qat.step: all``).

**prepare** replaces every selected Linear and Conv2d by :class:`~deepsqueeze.quant.fake_quant.FakeQuantLinear`
/ :class:`~deepsqueeze.quant.fake_quant.FakeQuantConv2d`: weights on a learned-step grid (LSQ, per output
channel or per group) or binary / ternary levels; with ``act_bits: 8`` the inputs on a learned per-tensor
grid (LSQ or PACT) or per token, a BatchNorm right after a conv folded into it and a ReLU after that fused,
and each conv's output on the grid the integer conv requantizes to. It starts where post-training
quantization ends: weight steps from the MSE-best clipping of each row (1.0 = min-max among the
candidates), activation ranges from the stage's observer on calibration batches (all at once on the float
model, as static PTQ calibrates), or, for weight-only transformers (``init: gptq``), GPTQ's codes and
group parameters. Mixed precision (``avg_bits``/``max_bytes``) takes each layer's width from the
sensitivity allocator of :mod:`deepsqueeze.quant.mixed`.

**train** runs :func:`deepsqueeze.train.train_classifier` (cross-entropy, plus Hinton soft targets from
the fp32 reference through ``deepsqueeze.train.losses.soft_target_loss`` when ``distill > 0``) or, for sentence
encoders, embedding matching to the fp32 model (:func:`deepsqueeze.train.finetune_model`). BatchNorm
statistics freeze after ``freeze_bn_after`` epochs (Krishnamoorthi 2018).

**convert** writes exactly the values the fake-quant model computed with into the same modules PTQ
produces, recording a replayable transform per layer: with ``act_bits: 8`` :class:`Int8Conv2d` (static,
ReLU fused, outputs chained as quantized tensors where the consumer is an integer layer) and
:class:`Int8Linear` (static or per token); weight-only :class:`PackedIntLinear` / :class:`PackedIntConv2d`
(binary at 1 bit, ternary at 2 bits, uniform at ``bits``). Int8 weights narrower than 8 bits are stored
at their width in the .dsq (encoding ``int-grid``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import record_encoding, record_transform
from deepsqueeze.core.walker import set_submodule
from deepsqueeze.errors import DataError, RecipeError, UnsupportedLayerError
from deepsqueeze.primitives.observers import make_observer
from deepsqueeze.primitives.quantize import fitting_group
from deepsqueeze.quant import int_grid as _int_grid  # noqa: F401  (registers the int-grid encoding)
from deepsqueeze.quant.api import (
    install,
    register_method,
    register_representation,
    run_batch,
    select_layers,
)
from deepsqueeze.quant.config import ActScheme, Method, QuantizeConfig
from deepsqueeze.quant.fake_quant import (
    ActFakeQuant,
    FakeQuantConv2d,
    FakeQuantLinear,
    WeightFakeQuant,
    fake_quant_modules,
)
from deepsqueeze.quant.qat_config import QATInit, QATOptions, QATStep, QATWeights
from deepsqueeze.runtime import (
    CONV_INPUT_BITS,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    PackedTernaryConv2d,
    PackedTernaryLinear,
)

__all__ = ["convert_qat_", "prepare_qat_", "qat_options", "train_qat"]

QAT_TYPES = (nn.Linear, nn.Conv2d)


def qat_options(config: QuantizeConfig) -> QATOptions:
    """The config's QAT options (defaults when the ``qat`` block is absent)."""
    return config.qat or QATOptions()


# ------------------------------------------------------------------------------------------ prepare


def _following(module: nn.Module, names: set[str], kind: type[nn.Module], skip_identity: bool = False
               ) -> dict[str, str]:
    """Target layer name -> name of the ``kind`` module right after it in a Sequential."""
    out = {}
    for seq_name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = [(n, c) for n, c in seq.named_children() if not (skip_identity and isinstance(c, nn.Identity))]
        for (cname, _), (nname, nxt) in zip(children, children[1:], strict=False):
            full = f"{seq_name}.{cname}" if seq_name else cname
            if full in names and isinstance(nxt, kind):
                out[full] = f"{seq_name}.{nname}" if seq_name else nname
    return out


_PASSTHROUGH = (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)
_PASSTHROUGH_CALLS = {torch.flatten, torch.reshape, torch.relu, "flatten", "view", "reshape", "contiguous", "relu"}


def _chained_consumers(module: nn.Module, convs: set[str], integer: set[str]) -> dict[str, str]:
    """Conv -> the one integer layer that consumes its output through monotone shape-only ops.

    Quantizing on the consumer's input grid commutes with max-pooling, ReLU and reshapes, so such a conv
    can hand its codes over as a quantized tensor. Found on the torch.fx graph; untraceable models chain nothing.
    """
    if not convs:
        return {}
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - tracing failure only disables chaining
        return {}
    modules = dict(module.named_modules())

    def consumers(node: torch.fx.Node) -> set[str] | None:
        found: set[str] = set()
        for user in node.users:
            if user.op == "call_module" and str(user.target) in integer:
                found.add(str(user.target))
                continue
            passthrough = (user.op == "call_module" and isinstance(modules.get(str(user.target)), _PASSTHROUGH)
                           or user.op in ("call_function", "call_method") and user.target in _PASSTHROUGH_CALLS)
            if not passthrough or user.args[0] is not node:
                return None
            below = consumers(user)
            if below is None:
                return None
            found |= below
        return found

    out = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in convs:
            found = consumers(node)
            if found is not None and len(found) == 1:
                out[str(node.target)] = next(iter(found))
    return out


def _first_last(names: list[str]) -> set[str]:
    return {names[0], names[-1]} if names else set()


def _weight_quant(layer: nn.Module, bits: int, config: QuantizeConfig, qat: QATOptions, levels: str,
                  symmetric: bool) -> WeightFakeQuant:
    rows, cols = layer.weight.shape[0], layer.weight[0].numel()
    group = fitting_group(cols, config.group_size)
    narrow = qat.act_bits is not None and bits == 8  # int8 kernels: symmetric codes -127..127
    return WeightFakeQuant(rows, cols, bits, group, symmetric, narrow, levels)


def prepare_qat_(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None = None, *,
                 bits: dict[str, int] | None = None) -> list[str]:
    """Install fake-quant modules in place of the selected Linear/Conv2d layers and quantize the embedding
    tables (``embeddings``) to their final int8 or packed rows, so training sees their error; returns the
    names.

    ``batches`` (calibration inputs, never the evaluation split) initialise the activation ranges (needed
    with ``act_bits``) and GPTQ (``init: gptq``). ``bits`` overrides the weight width per layer (mixed
    precision). Raises :class:`RecipeError` for options that cannot apply, :class:`DataError` without batches.
    """
    qat = qat_options(config)
    if any(isinstance(m, (FakeQuantLinear, FakeQuantConv2d)) for m in module.modules()):
        raise RecipeError("this model is already prepared for QAT: train it, then convert (qat.step: convert)")
    layers = select_layers(module, config, QAT_TYPES)
    if not layers:
        raise RecipeError("QAT found no Linear or Conv2d layer to quantize: check include/exclude")
    names = [n for n, _ in layers]
    static = qat.act_bits is not None
    if static and not batches:
        raise DataError("QAT with act_bits 8 calibrates its activation ranges on data: pass calibration batches "
                        "(recipes: --data, e.g. fashion-mnist)")
    widths = {n: config.bits for n in names}
    if qat.first_last_bits is not None and len(names) > 1:
        for n in _first_last(names):
            widths[n] = qat.first_last_bits
    widths.update({n: b for n in names if (b := config.override(n)) is not None})
    if bits:
        widths.update({n: b for n, b in bits.items() if n in widths})
    # Embedding tables take their final codes now, so training (and GPTQ's calibration) sees their rounding
    # error and the other layers learn around it; convert then finds nothing left to round.
    embedded = _embeddings(module, config) if config.embeddings else []
    gptq_params = _gptq_init(module, config, qat, names, widths, batches) if qat.init is QATInit.GPTQ else {}
    layers = [(n, module.get_submodule(n)) for n in names]  # GPTQ replaced the Linear layers

    conv_names = {n for n, m in layers if isinstance(m, nn.Conv2d)}
    bns = _following(module, conv_names, nn.BatchNorm2d)
    relus = _following(module, conv_names, nn.ReLU) if static else {}
    for conv, bn in bns.items():  # ReLU after conv-BN
        if static:
            after = _following(module, {bn}, nn.ReLU)
            if bn in after:
                relus[conv] = after[bn]
    bn_modules = {conv: module.get_submodule(bn) for conv, bn in bns.items()}
    for slot in [*bns.values(), *relus.values()]:
        set_submodule(module, slot, nn.Identity())  # folded into / fused with the conv
    per_token = {n for n, m in layers if isinstance(m, nn.Linear) and config.activations is ActScheme.PER_TOKEN}
    chained = _chained_consumers(module, conv_names, set(names) - per_token) if static else {}
    act_mode = qat.act_quantizer.value
    prepared = []
    for name, layer in layers:
        special = qat.first_last_bits is not None and name in _first_last(names) and len(names) > 1
        levels = QATWeights.UNIFORM.value if special else qat.weights.value
        symmetric = config.symmetric or static
        if name in gptq_params:
            symmetric = False
        wq = _weight_quant(layer, widths[name], config, qat, levels, symmetric)
        input_quant = None
        if static:
            input_quant = ActFakeQuant(8, "per_token") if name in per_token else ActFakeQuant(CONV_INPUT_BITS,
                                                                                                act_mode)
        if isinstance(layer, nn.Linear):
            new: nn.Module = FakeQuantLinear(layer, wq, input_quant)
        else:
            if not isinstance(layer.padding, tuple) or layer.padding_mode != "zeros":
                raise UnsupportedLayerError(f"{name}: QAT converts convolutions with numeric zero padding only; "
                                            "exclude it")
            bn = bn_modules.get(name)
            output_quant = ActFakeQuant(8, act_mode) if static and name not in chained else None
            new = FakeQuantConv2d(layer, wq, input_quant, bn, name in relus, output_quant)  # type: ignore[arg-type]
            new.bn_name, new.relu_name = bns.get(name), relus.get(name)  # type: ignore[assignment]
            new.chained_to = chained.get(name)  # type: ignore[assignment]
        w, _ = new.folded()  # type: ignore[operator]
        if name in gptq_params:
            wq.set_params(*gptq_params[name])
        else:
            wq.initialize(w)
        set_submodule(module, name, new)
        prepared.append(name)
    if static:
        _calibrate_activations(module, config, batches or [])
    return prepared + embedded


def _gptq_init(module: nn.Module, config: QuantizeConfig, qat: QATOptions, names: list[str],
               widths: dict[str, int], batches: list[Any] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run GPTQ on the Linear targets and leave its dequantized weights in place; return (scale, zero) per layer."""
    from deepsqueeze.quant.gptq import dequantized_linear, gptq_model_

    if qat.act_bits is not None or qat.weights is not QATWeights.UNIFORM:
        raise RecipeError("init: gptq starts weight-only uniform QAT: set qat.act_bits to null and weights uniform")
    if not batches:
        raise DataError("init: gptq calibrates on data: pass calibration batches (e.g. pydoc-sentences:calib)")
    linears = [n for n in names if isinstance(module.get_submodule(n), nn.Linear)]
    results = gptq_model_(module, batches, bits={n: widths[n] for n in linears}, group_size=config.group_size,
                          symmetric=config.symmetric, act_order=False, damp=config.damp, targets=linears,
                          build=dequantized_linear)
    return {n: (r.scale.float(), r.zero_point.float()) for n, r in results.items()}


def _calibrate_activations(module: nn.Module, config: QuantizeConfig, batches: list[Any]) -> None:
    quants = [q for _, m in fake_quant_modules(module) for q in (m.input_quant, getattr(m, "output_quant", None))
              if isinstance(q, ActFakeQuant) and q.mode != "per_token"]
    for q in quants:
        q.observer = make_observer(config.observer.value, q.bits, symmetric=False, signed=False,
                                   percentile=config.percentile)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(module, batch)
    finally:
        module.train(was_training)
    for q in quants:
        obs = q.observer
        if obs is None or obs.seen == 0:
            q.observer = None
            q.enabled = False  # never reached: stays float (convert keeps such layers float too)
            continue
        qp = obs.qparams(q.bits, symmetric=False, signed=False)
        q.initialize(float(qp.scale), float(qp.zero_point))


# ------------------------------------------------------------------------------------------ train


def train_qat(model: Model, config: QuantizeConfig, data: Any, *, reference: Model | None = None,
              device: torch.device | str = "cpu", seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Train the prepared ``model`` with the one training loop; returns the loop's statistics.

    Classifiers: cross-entropy on ``data``'s training split, mixed with soft targets from ``reference``
    (the fp32 model) when ``qat.distill > 0``. Sentence encoders: cosine matching of ``reference``'s
    embeddings, with dropout off (it would hide the quantization error in noise); ``qat.distill > 0`` adds
    the token-level hidden-state loss of every layer at that weight (TinyBERT, through the distill stage).
    BatchNorm freezes after ``qat.freeze_bn_after`` epochs.
    """
    from deepsqueeze.data.datasets import ClassificationData, TextData
    from deepsqueeze.train import finetune_model, train_classifier

    qat = qat_options(config)
    convs = [m for _, m in fake_quant_modules(model.module) if isinstance(m, FakeQuantConv2d) and m.bn is not None]
    if data is None:
        raise DataError("QAT trains on data: pass --data (e.g. fashion-mnist or pydoc-sentences:calib)")
    fit_args: dict[str, Any] = {"epochs": qat.epochs, "lr": qat.lr, "optimizer": qat.optimizer,
                                "schedule": qat.schedule, "weight_decay": qat.weight_decay, "seed": seed,
                                "progress": progress}
    if model.task is Task.SENTENCE_ENCODER:
        if not isinstance(data, TextData):
            raise DataError(f"QAT of a sentence encoder trains on sentences, not {data.name}")
        if reference is None:
            raise DataError("QAT of a sentence encoder needs the fp32 model as its reference")
        from deepsqueeze.core.config import stage_entry
        from deepsqueeze.core.context import StageContext

        ctx = StageContext(model=model, data=data, reference=reference, device=torch.device(device), seed=seed,
                           progress=progress)
        if qat.distill > 0:  # the distill stage (student: self): embedding cosine + hidden states of every layer
            distill_config, distill_stage = stage_entry("distill")  # techniques meet through core's registry
            distill = distill_config(epochs=qat.epochs, lr=qat.lr, batch_size=qat.batch_size, optimizer=qat.optimizer,
                                     schedule=qat.schedule, weight_decay=qat.weight_decay, limit=qat.limit,
                                     hidden_weight=qat.distill, augment=qat.augment)
            return distill_stage(model, distill, ctx)
        return finetune_model(model, ctx, batch_size=qat.batch_size, limit=qat.limit, what="QAT", dropout=False,
                              **fit_args)
    if not isinstance(data, ClassificationData):
        raise DataError(f"QAT of a classifier trains on image data, not {data.name}")
    n = len(data.train_x) if qat.limit is None else min(qat.limit, len(data.train_x))
    steps_per_epoch = -(-n // qat.batch_size)
    freeze_at = None if qat.freeze_bn_after is None else int(round(qat.freeze_bn_after * steps_per_epoch))

    def before_step(step: int, total: int) -> None:
        if freeze_at is not None and step >= freeze_at:
            for conv in convs:
                if not conv.bn_frozen:
                    conv.freeze_bn()

    loss_fn = None
    if qat.distill > 0:
        if reference is None:
            raise DataError("qat.distill needs the fp32 model as the teacher (the recipe's reference)")
        from deepsqueeze.train.losses import soft_target_loss

        teacher = reference.module.to(device).eval()

        def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                t = teacher(x)
            return soft_target_loss(m(x), t, y, temperature=qat.temperature, alpha=qat.distill)

    return train_classifier(model.module, data, batch_size=qat.batch_size, loss_fn=loss_fn, device=device,
                            limit=qat.limit, before_step=before_step, **fit_args)


# ------------------------------------------------------------------------------------------ convert


def _packed(layer: FakeQuantLinear | FakeQuantConv2d, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    wq = layer.weight_quant
    binary = wq.levels == "binary"
    bits = 2 if wq.levels in ("ternary", "ttq") else wq.bits
    group = None if wq.group_size == wq.cols else wq.group_size
    if wq.levels == "ttq":
        ttq: PackedTernaryLinear | PackedTernaryConv2d
        if isinstance(layer, FakeQuantLinear):
            ttq = PackedTernaryLinear(layer.in_features, layer.out_features, b is not None)
        else:
            ttq = PackedTernaryConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                                      layer.stride, layer.padding, layer.dilation, layer.groups,  # type: ignore[arg-type]
                                      b is not None)
        ttq.set_levels(wq.codes(w), wq.pos_scale.detach().abs(), wq.neg_scale.detach().abs())
        if b is not None:
            ttq.bias.copy_(b.detach().float())
        return ttq
    if isinstance(layer, FakeQuantLinear):
        new: PackedIntLinear | PackedIntConv2d = PackedIntLinear(layer.in_features, layer.out_features, bits, group,
                                                                 b is not None, binary)
    else:
        new = PackedIntConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                              layer.stride, layer.padding, layer.dilation, layer.groups,  # type: ignore[arg-type]
                              b is not None, bits, group, binary)
    codes = wq.codes(w)
    scale = wq.row_scale(w)
    if binary:
        new.set_codes(codes.to(torch.uint8), scale.expand_as(new.scale), None)
    elif wq.levels == "ternary":
        new.set_codes((codes + 1).to(torch.uint8), scale, torch.ones_like(scale, dtype=torch.uint8))
    else:
        new.set_codes((codes - wq.qmin).to(torch.uint8), scale, (wq.zero_point - wq.qmin).to(torch.uint8))
    if b is not None:
        new.bias.copy_(b.detach().float())
    return new


def _int8_weight(layer: FakeQuantLinear | FakeQuantConv2d, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes and per-channel scales of the fake-quant weight."""
    wq = layer.weight_quant
    codes = wq.codes(w)
    if wq.levels == "binary":
        codes = 2 * codes - 1
    elif wq.levels == "ttq":
        raise UnsupportedLayerError("ttq weights have separate positive and negative scales, which int8 "
                                    "per-channel codes cannot hold: use weights ternary")
    elif wq.levels == "uniform" and (wq.group_size != wq.cols or bool((wq.zero_point != 0).any())):
        raise UnsupportedLayerError("int8 execution needs symmetric per-channel weights (no groups, zero point 0)")
    return codes.to(torch.int8).reshape(w.shape), wq.row_scale(w).reshape(-1)


def _int8(layer: FakeQuantLinear | FakeQuantConv2d, w: torch.Tensor, b: torch.Tensor | None,
          consumers: dict[str, ActFakeQuant]) -> nn.Module:
    codes, scale = _int8_weight(layer, w)
    q = layer.input_quant
    assert q is not None
    if isinstance(layer, FakeQuantLinear):
        act = "per_token" if q.mode == "per_token" else "static"
        new: Int8Linear | Int8Conv2d = Int8Linear(layer.in_features, layer.out_features, b is not None, act)
        if act == "static":
            s, z = q.qparams()
            new.input_scale.fill_(s)
            new.input_zero_point.fill_(z)
    else:
        chained = getattr(layer, "chained_to", None)
        out_q = consumers[chained] if chained else layer.output_quant
        assert out_q is not None
        new = Int8Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
                         layer.stride, layer.padding, layer.dilation, layer.groups, b is not None,  # type: ignore[arg-type]
                         layer.relu, quantized_output=chained is not None)
        s, z = q.qparams()
        new.input_scale.fill_(s)
        new.input_zero_point.fill_(z)
        s, z = out_q.qparams()
        new.output_scale.fill_(s)
        new.output_zero_point.fill_(z)
    new.weight.copy_(codes)
    new.weight_scale.copy_(scale)
    if b is not None:
        new.bias.copy_(b.detach().float())
    return new


def convert_qat_(module: nn.Module, config: QuantizeConfig | None = None) -> list[str]:
    """Replace every fake-quant module of ``module`` by its integer or packed module; returns their names.

    The new modules hold exactly the codes and scales the fake-quant forward pass used; one replayable
    transform is recorded per module (plus ``quant.identity`` for folded BatchNorms and fused ReLUs), and
    int8 weights narrower than 8 bits are marked for the ``int-grid`` encoding. With ``config``, embedding
    tables still in float (a model prepared without ``embeddings``) are then quantized as PTQ does.
    """
    layers = fake_quant_modules(module)
    if not layers:
        raise RecipeError("nothing to convert: the model has no fake-quant modules (run qat.step prepare first)")
    consumers = {name: m.input_quant for name, m in layers if m.input_quant is not None}
    done = []
    with torch.no_grad():
        for name, layer in layers:
            w, b = layer.folded()
            w, b = w.detach(), None if b is None else b.detach()
            if layer.input_quant is None or not layer.input_quant.enabled:
                new = _packed(layer, w, b)
            else:
                new = _int8(layer, w, b, consumers)
            install(module, name, new)
            if isinstance(new, (Int8Linear, Int8Conv2d)) and layer.weight_quant.bits < 8:
                wq = layer.weight_quant
                grid = {"binary": (-1, 1, 2), "ternary": (-1, 1, 1)}.get(wq.levels, (wq.qmin, wq.qmax, 1))
                record_encoding(module, f"{name}.weight", "int-grid", low=grid[0], high=grid[1], step=grid[2])
            for extra in (getattr(layer, "bn_name", None), getattr(layer, "relu_name", None)):
                if extra:
                    record_transform(module, "quant.identity", extra)
            done.append(name)
        if config is not None and config.embeddings:
            done += _embeddings(module, config)
    return done


def _embeddings(module: nn.Module, config: QuantizeConfig) -> list[str]:
    qat = qat_options(config)
    done = []
    for name, layer in select_layers(module, config, (nn.Embedding,)):
        if qat.act_bits is not None:
            new: nn.Module = Int8Embedding.from_float(layer)
        else:
            new = PackedIntEmbedding.from_float(layer, config.bits_for(name, config.embedding_bits),
                                                fitting_group(layer.embedding_dim, config.group_size),
                                                config.symmetric)
        install(module, name, new)
        done.append(name)
    return done


# ------------------------------------------------------------------------------------------ the stage


def mixed_widths(module: nn.Module, config: QuantizeConfig, batches: list[Any]) -> dict[str, int]:
    """Per-layer weight widths from the mixed-precision sensitivity allocator (``avg_bits``/``max_bytes``)."""
    from deepsqueeze.quant.mixed import DEFAULT_CANDIDATES, allocate_bits, layer_costs, layer_sensitivity

    names = [n for n, _ in select_layers(module, config, QAT_TYPES)]
    candidates = [b for b in DEFAULT_CANDIDATES if b <= config.bits]
    if not candidates:
        raise RecipeError(f"mixed-precision QAT chooses among {DEFAULT_CANDIDATES} up to bits: raise bits")
    costs = layer_costs(module, names, candidates, config.group_size)
    budget = None
    if config.max_bytes is not None:
        targets = {f"{n}.weight" for n in names}
        fixed = sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k not in targets)
        budget = config.max_bytes - fixed
        if budget <= 0:
            raise RecipeError(f"max_bytes {config.max_bytes} does not even hold the tensors left in float: raise it")
    was_training = module.training
    module.eval()
    try:
        sens = layer_sensitivity(module, batches[:4], names, candidates, config.group_size, config.symmetric)
    finally:
        module.train(was_training)
    return allocate_bits(costs, sens, budget, config.avg_bits)


def qat_model_(model: Model, config: QuantizeConfig, data: Any, batches: list[Any] | None, *,
               reference: Model | None = None, device: torch.device | str = "cpu", seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """All three steps on ``model`` as one call (the recipe stage); returns a report."""
    qat = qat_options(config)
    report: dict[str, Any] = {"stage": "quantize", "method": "qat", "bits": config.bits, "step": qat.step.value}
    if qat.step in (QATStep.ALL, QATStep.PREPARE):
        widths = None
        if config.avg_bits is not None or config.max_bytes is not None:
            if not batches:
                raise DataError("mixed-precision QAT measures layer sensitivity on data: pass calibration batches")
            widths = mixed_widths(model.module, config, batches)
            report["bits_per_layer"] = widths
        report["layers"] = len(prepare_qat_(model.module, config, batches, bits=widths))
    if qat.step is QATStep.ALL:
        stats = train_qat(model, config, data, reference=reference, device=device, seed=seed, progress=progress)
        report["train_loss"] = round(float(stats["loss"]), 5)
        model.module.cpu()
    if qat.step in (QATStep.ALL, QATStep.CONVERT):
        model.module.eval()
        report["layers"] = len(convert_qat_(model.module, config))
    return report


def qat_stage(model: Model, config: QuantizeConfig, ctx: Any) -> None:
    """The ``quantize`` stage with ``method: qat``: calibration batches from ``ctx.data``, then the steps."""
    from deepsqueeze.core.calibrate import calibration_batches

    qat = qat_options(config)
    needs_data = qat.step is not QATStep.CONVERT and (
        qat.act_bits is not None or qat.init is QATInit.GPTQ or config.avg_bits is not None
        or config.max_bytes is not None)
    batches = calibration_batches(model, ctx.data, samples=config.calibration_samples) if needs_data else None
    ctx.report.append(qat_model_(model, config, ctx.data, batches, reference=ctx.reference, device=ctx.device,
                                 seed=ctx.seed, progress=ctx.progress))


# Between prepare and convert a fake-quant layer stands for the integer layer it becomes.
register_representation(FakeQuantLinear)
register_representation(FakeQuantConv2d)


@register_method(Method.QAT)
def _qat_method(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    """``quantize_`` with ``method: qat`` runs one explicit step: ``prepare`` or ``convert`` (training is
    ``train_qat``, or the recipe stage with ``step: all``)."""
    qat = qat_options(config)
    if qat.step is QATStep.PREPARE:
        with torch.enable_grad():
            return prepare_qat_(module, config, batches)
    if qat.step is QATStep.CONVERT:
        return convert_qat_(module, config)
    raise RecipeError("quantize_ runs one QAT step: set qat.step to prepare or convert (and train in between "
                      "with train_qat), or use the quantize stage in a recipe, which runs all three")


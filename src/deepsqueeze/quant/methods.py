"""The built-in methods of :func:`~deepsqueeze.quant.api.quantize_`, registered by name: ``dynamic`` and
``smoothquant`` (Int8Linear with dynamic int8 activations), ``static`` (calibrated Int8Linear / Int8Conv2d,
BatchNorm folded, ReLU fused, convolutions chained in integers), ``rtn`` (packed weight-only codes),
``binary`` and ``ternary``. GPTQ, AWQ, mixed precision and QAT register from their own modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsqueeze import runtime
from deepsqueeze.core.record import NOT_DIVISIBLE, record_transform
from deepsqueeze.core.walker import set_submodule
from deepsqueeze.errors import DataError, UnsupportedLayerError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.primitives.observers import Observer, make_observer
from deepsqueeze.quant.api import install, note_skip, register_method, run_calibration, select_layers
from deepsqueeze.quant.config import Method, QuantizeConfig
from deepsqueeze.quant.fold import conv_batchnorm_pairs
from deepsqueeze.quant.gguf_types import packed_on_grid, tensor_grids


def _install_identity(root: nn.Module, name: str) -> None:
    set_submodule(root, name, nn.Identity())
    record_transform(root, "quant.identity", name)


def _need_batches(config: QuantizeConfig, batches: list[Any] | None) -> list[Any]:
    if not batches:
        raise DataError(f"quantize method {config.method.value} calibrates on data: pass calibration batches "
                        "(recipes: --data, e.g. fashion-mnist or pydoc-sentences:calib)")
    return batches


def _activation_qparams(observer: Observer, bits: int = 8) -> tuple[float, float]:
    qp = observer.qparams(bits, symmetric=False, signed=False)
    return float(qp.scale), float(qp.zero_point)


def _new_observer(config: QuantizeConfig) -> Observer:
    return make_observer(config.observer.value, 8, symmetric=False, signed=False, percentile=config.percentile)


@register_method(Method.DYNAMIC)
def _dynamic(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    done = []
    for name, layer in select_layers(module, config, (nn.Linear, nn.Embedding)):
        if isinstance(layer, nn.Linear):
            install(module, name, runtime.Int8Linear.from_float(layer, config.activations.value))
        else:
            install(module, name, runtime.Int8Embedding.from_float(layer))
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
        install(module, name, runtime.Int8Linear.from_float(layer, config.activations.value, smooth=s))
        done.append(name)
    for name, layer in select_layers(module, config, (nn.Embedding,)):
        install(module, name, runtime.Int8Embedding.from_float(layer))
        done.append(name)
    return done


def _fold_batchnorm(module: nn.Module, conv_names: set[str]) -> None:
    """Fold each BatchNorm2d applied to a target Conv2d's output into the conv, wherever the forward applies
    it (``quant.fold.conv_batchnorm_pairs``: a Sequential's next module or a block's ``bn1(conv1(x))``)."""
    modules = dict(module.named_modules())
    for full, bname in conv_batchnorm_pairs(module).items():
        conv, bn = modules[full], modules[bname]
        if full in conv_names and isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            if bn.running_mean is None or bn.running_var is None:
                continue
            factor = (bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
                bn.running_var + bn.eps)
            shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.data = conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
            _install_identity(module, bname)


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
        qin = _activation_qparams(observers_in[name], runtime.CONV_INPUT_BITS)
        if isinstance(layer, nn.Conv2d):
            out_bits = runtime.CONV_INPUT_BITS if name in chained else 8
            qout = _activation_qparams(observers_out[name], out_bits)
            new: nn.Module = runtime.Int8Conv2d.from_float(layer, qin, qout, relu=name in relus,
                                                           quantized_output=name in chained)
            install(module, name, new)
        else:
            install(module, name, runtime.Int8Linear.from_float(layer, "static", input_qparams=qin))
        done.append(name)
    for name, layer in select_layers(module, config, (nn.Embedding,)):
        install(module, name, runtime.Int8Embedding.from_float(layer))
        done.append(name)
    return done


@register_method(Method.RTN)
def _rtn(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    done = []
    grids = None if config.gguf_type is None else tensor_grids(module, config.gguf_type)
    for name, layer in select_layers(module, config, (nn.Linear, nn.Conv2d, nn.Embedding)):
        new: nn.Module
        if grids is not None:
            grid = grids.get(name)
            if grid is None:
                note_skip(module, name, f"{NOT_DIVISIBLE}: GGUF {config.gguf_type.value} holds Linear layers and "
                          "embeddings whose rows are whole blocks of 32: kept in float")
                continue
            install(module, name, packed_on_grid(layer, grid))
            done.append(name)
            continue
        row = layer.in_features if isinstance(layer, nn.Linear) else layer.embedding_dim \
            if isinstance(layer, nn.Embedding) else None
        group = config.group_size if row is None else Q.fitting_group(row, config.group_size)
        if row is not None and config.group_size is not None and group is None:
            note_skip(module, name, f"{NOT_DIVISIBLE}: group {config.group_size} fits no divisor of {row}, one "
                      "scale per row")
        try:
            if isinstance(layer, nn.Linear):
                new = runtime.PackedIntLinear.from_float(layer, config.bits_for(name), group, config.symmetric,
                                                         float_zero=config.float_zero)
            elif isinstance(layer, nn.Conv2d):
                new = runtime.PackedIntConv2d.from_float(layer, config.bits_for(name),
                                                         _conv_group(layer, config.group_size), config.symmetric)
            else:
                new = runtime.PackedIntEmbedding.from_float(layer, config.bits_for(name, config.embedding_bits),
                                                            group, config.symmetric, config.float_zero)
        except ValueError as exc:
            note_skip(module, name, f"{NOT_DIVISIBLE}: {exc}")
            continue
        install(module, name, new)
        done.append(name)
    return done


def _conv_group(conv: nn.Conv2d, group_size: int | None) -> int | None:
    """A conv row is ``in/groups*kh*kw`` long: fall back to per channel when the group does not divide it."""
    row = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return Q.fitting_group(row, group_size)


def _levels(module: nn.Module, config: QuantizeConfig, ternary: bool) -> list[str]:
    done = []
    for name, layer in select_layers(module, config, (nn.Linear, nn.Conv2d)):
        if isinstance(layer, nn.Linear):
            new: runtime.PackedIntLinear | runtime.PackedIntConv2d = runtime.PackedIntLinear(
                layer.in_features, layer.out_features, 2, None, layer.bias is not None, binary=not ternary)
        else:
            if not isinstance(layer.padding, tuple):
                raise UnsupportedLayerError(f"{name}: string padding is not supported; exclude it")
            new = runtime.PackedIntConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,  # type: ignore[arg-type]
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

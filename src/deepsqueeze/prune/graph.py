"""Dependency analysis for structured pruning: which channels of which layers must be cut together.

The model is traced with ``torch.fx`` and shapes are propagated with an example input. Every tensor
gets a *channel layout*: the list of segments its channel dimension (dim 1) is made of, each segment
being ``channels`` channels of one dependency group, ``repeat`` consecutive features per channel (a
flattened ``C x H x W`` map gives each channel ``H*W`` features). Layers that create channels (Conv2d,
Linear) open a new group; elementwise and spatial ops pass the layout on; a residual addition merges
the groups of its operands (union-find); ``torch.cat`` on dim 1 concatenates layouts; a depthwise
convolution passes the layout on and is cut with it. Anything else that sees channels (an unknown
op, the model output, the model input, a grouped convolution) *blocks* the groups it touches, with
the reason kept, so the driver can never produce a silently broken model.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from deepsqueeze.errors import UnsupportedLayerError


@dataclass(frozen=True)
class Segment:
    group: int
    channels: int
    repeat: int = 1


Layout = tuple[Segment, ...]


@dataclass
class Group:
    """Channels that must be removed together; ``producers`` are the layers whose outputs define them."""

    id: int
    channels: int
    producers: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # why it cannot be pruned

    @property
    def prunable(self) -> bool:
        return bool(self.producers) and not self.blocked


@dataclass
class LayerRole:
    """How one layer meets the groups: which group indexes its output dim and the layout of its input dim."""

    name: str
    module: nn.Module
    out_group: int | None = None  # producers (Conv/Linear) and pass-through layers (BN, depthwise conv)
    in_layout: Layout = ()  # consumers: the segments that make up the input features/channels


# Modules whose output has the input's channels, unchanged (elementwise or spatial-only).
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
_PASS_THROUGH_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
    nn.functional.silu, nn.functional.leaky_relu, nn.functional.hardswish, nn.functional.sigmoid,
    nn.functional.dropout, nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
    nn.functional.adaptive_max_pool2d, nn.functional.interpolate,
}
_PASS_THROUGH_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "relu_"}
_ADD_OPS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, operator.mul, torch.mul}
_ADD_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SHAPE_METHODS = {"size", "dim"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


@dataclass
class DependencyGraph:
    """The result of ``analyze``: groups (by id) and the role of every channel-bearing layer."""

    groups: dict[int, Group]
    layers: dict[str, LayerRole]

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups.values() if g.prunable]

    def group_of(self, layer: str) -> Group | None:
        role = self.layers.get(layer)
        return None if role is None or role.out_group is None else self.groups[role.out_group]

    def describe(self) -> list[str]:
        lines = []
        for g in self.groups.values():
            state = "prunable" if g.prunable else f"fixed ({'; '.join(g.blocked) or 'no producer'})"
            lines.append(f"group {g.id}: {g.channels} channels, producers {g.producers}: {state}")
        return lines


def _is_depthwise(conv: nn.Conv2d | nn.Conv1d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class _Analyzer:
    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.uf = _UnionFind()
        self.channels: list[int] = []
        self.producers: dict[int, list[str]] = {}
        self.blocked: dict[int, list[str]] = {}
        self.layers: dict[str, LayerRole] = {}
        self.layouts: dict[str, Layout | None] = {}
        self.roles: list[LayerRole] = []  # every call, including repeated calls of a shared layer
        self.shared: set[str] = set()

    def new_group(self, channels: int, producer: str | None = None) -> int:
        gid = self.uf.new()
        self.channels.append(channels)
        if producer is not None:
            self.producers.setdefault(gid, []).append(producer)
        return gid

    def block(self, layout: Layout | None, reason: str) -> None:
        for seg in layout or ():
            self.blocked.setdefault(seg.group, []).append(reason)

    def merge(self, a: Layout, b: Layout, where: str) -> Layout:
        if [(s.channels, s.repeat) for s in a] != [(s.channels, s.repeat) for s in b]:
            self.block(a, f"{where} combines tensors whose channels do not line up")
            self.block(b, f"{where} combines tensors whose channels do not line up")
            return a
        return tuple(Segment(self.uf.union(x.group, y.group), x.channels, x.repeat) for x, y in zip(a, b, strict=True))

    def layout_arg(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def run(self, gm: torch.fx.GraphModule) -> DependencyGraph:
        for node in gm.graph.nodes:
            self.layouts[node.name] = self.visit(gm, node)
            if node.op == "call_module" and str(node.target) in self.layers:
                self.roles.append(self.layers[str(node.target)])
        for role in self.roles:
            if role.name in self.shared:
                reason = f"{role.name} is called more than once (shared weights)"
                self.block(role.in_layout, reason)
                if role.out_group is not None:
                    self.blocked.setdefault(role.out_group, []).append(reason)
        groups: dict[int, Group] = {}
        for gid in range(len(self.channels)):
            root = self.uf.find(gid)
            group = groups.setdefault(root, Group(root, self.channels[root]))
            if self.channels[gid] != group.channels:
                group.blocked.append("coupled layers disagree on the channel count")
            group.producers += self.producers.get(gid, [])
            group.blocked += self.blocked.get(gid, [])
        for role in self.layers.values():
            if role.out_group is not None:
                role.out_group = self.uf.find(role.out_group)
            role.in_layout = tuple(Segment(self.uf.find(s.group), s.channels, s.repeat) for s in role.in_layout)
        return DependencyGraph(groups, self.layers)

    def visit(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> Layout | None:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            gid = self.new_group(shape[1])
            self.blocked.setdefault(gid, []).append("channels of the model input")
            return (Segment(gid, shape[1]),)
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                self.block(self.layout_arg(arg), "reaches the model output")
            return None
        if node.op == "get_attr":
            return None
        inputs = [self.layout_arg(a) for a in _flat_nodes(node.args) + _flat_nodes(node.kwargs)]
        first = self.layout_arg(node.args[0]) if node.args else None
        if node.op == "call_module":
            return self.visit_module(node, gm.get_submodule(str(node.target)), first, inputs)
        target = node.target
        label = node.op + ":" + getattr(target, "__name__", str(target))
        if node.op == "call_method" and target in _SHAPE_METHODS or node.op == "call_function" and target in (
                getattr, operator.getitem) and shape is None:
            return None
        if (node.op == "call_function" and target in _PASS_THROUGH_FUNCTIONS) or (
                node.op == "call_method" and target in _PASS_THROUGH_METHODS):
            return first
        if (node.op == "call_function" and target in _ADD_OPS) or (node.op == "call_method" and target in _ADD_METHODS):
            tensors = [lay for lay in inputs if lay is not None]
            if not tensors:
                return None
            out = tensors[0]
            for other in tensors[1:]:
                out = self.merge(out, other, f"{node.name} ({label})")
            return out
        if node.op == "call_function" and target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = [self.layout_arg(a) for a in _flat_nodes(node.args[0])]
            if dim == 1 and all(p is not None for p in parts):
                return tuple(seg for p in parts for seg in p)  # type: ignore[union-attr]
            for p in parts:
                self.block(p, f"{node.name} concatenates along dim {dim}, not the channel dim")
            return None
        if (node.op == "call_function" and target in _REDUCE_FUNCTIONS) or (
                node.op == "call_method" and target in _REDUCE_METHODS):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, list | tuple) else None
            if first is not None and dims and all(isinstance(d, int) and d >= 2 for d in dims):
                return first  # reduction over spatial dims keeps the channels
        if (node.op == "call_function" and target is torch.flatten) or (
                node.op == "call_method" and target in _FLATTEN_METHODS):
            return self.flatten(node, first, shape)
        if first is not None or any(lay is not None for lay in inputs):
            for lay in inputs:
                self.block(lay, f"consumed by {node.name} ({label}), which structured pruning does not know")
            if shape is not None and len(shape) >= 2:
                gid = self.new_group(shape[1])
                self.blocked.setdefault(gid, []).append(f"produced by {node.name} ({label})")
                return (Segment(gid, shape[1]),)
        return None

    def flatten(self, node: torch.fx.Node, layout: Layout | None, shape: tuple[int, ...] | None) -> Layout | None:
        src = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], torch.fx.Node) else None
        src_shape = tuple(src.shape) if src is not None else None
        if layout is None or src_shape is None or shape is None:
            return layout
        if shape == src_shape:
            return layout
        if len(shape) == 2 and shape[0] == src_shape[0] and len(src_shape) >= 2:
            spatial = 1
            for s in src_shape[2:]:
                spatial *= s
            return tuple(Segment(s.group, s.channels, s.repeat * spatial) for s in layout)
        self.block(layout, f"{node.name} reshapes {src_shape} to {shape}, which mixes channels with other dims")
        return None

    def visit_module(self, node: torch.fx.Node, module: nn.Module, layout: Layout | None,
                     inputs: list[Layout | None]) -> Layout | None:
        name = str(node.target)
        if name in self.layers:
            self.shared.add(name)
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if isinstance(module, nn.Conv2d | nn.Conv1d):
            if _is_depthwise(module):
                self.layers[name] = LayerRole(name, module, out_group=layout[0].group if layout else None,
                                              in_layout=layout or ())
                if layout is None or len(layout) != 1 or layout[0].repeat != 1:
                    self.block(layout, f"depthwise {name} sees a concatenated input")
                return layout
            gid = self.new_group(module.out_channels, name)
            if module.groups > 1:
                self.block(layout, f"{name} is a grouped convolution (groups={module.groups})")
                self.blocked.setdefault(gid, []).append(f"{name} is a grouped convolution (groups={module.groups})")
            self.layers[name] = LayerRole(name, module, out_group=gid, in_layout=layout or ())
            return (Segment(gid, module.out_channels),)
        if isinstance(module, nn.Linear):
            gid = self.new_group(module.out_features, name)
            if shape is not None and len(shape) != 2:
                self.block(layout, f"{name} is applied to a {len(shape)}-d tensor (channels are not dim 1)")
                self.blocked.setdefault(gid, []).append(f"{name} output is {len(shape)}-d")
            self.layers[name] = LayerRole(name, module, out_group=gid, in_layout=layout or ())
            return (Segment(gid, module.out_features),)
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            self.layers[name] = LayerRole(name, module, in_layout=layout or ())
            if layout is not None and any(s.repeat != 1 for s in layout):
                self.block(layout, f"{name} normalises flattened features")
            return layout
        if isinstance(module, PASS_THROUGH_MODULES):
            return layout
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1:
                self.block(layout, f"{name} flattens from dim {module.start_dim}")
                return None
            return self.flatten(node, layout, shape)
        for lay in inputs:
            self.block(lay, f"consumed by {name} ({type(module).__name__}), which has no surgery rule")
        if shape is not None and len(shape) >= 2:
            gid = self.new_group(shape[1])
            self.blocked.setdefault(gid, []).append(f"produced by {name} ({type(module).__name__})")
            return (Segment(gid, shape[1]),)
        return None


def _flat_nodes(args: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


class _Tracer(torch.fx.Tracer):
    """Keeps every module with a surgery rule (and known pass-through modules) as one leaf call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or isinstance(m, nn.Linear | nn.Conv2d | nn.BatchNorm2d)


def trace(module: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``module`` (UnsupportedLayerError, naming the cause, when fx cannot)."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise UnsupportedLayerError(
            f"{type(module).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {str(exc)[:160]}): "
            "structured pruning needs a traceable forward (no data-dependent control flow)") from None
    return torch.fx.GraphModule(module, graph)


def analyze(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> DependencyGraph:
    """Trace ``module``, propagate shapes from ``example`` and return its channel dependency groups."""
    gm = trace(module)
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        raise UnsupportedLayerError(
            f"shape propagation through {type(module).__name__} failed ({type(exc).__name__}: {str(exc)[:160]}): "
            "check the example input shape") from None
    finally:
        module.train(was_training)
    return _Analyzer(module).run(gm)

"""Which BatchNorm follows which convolution, wherever the model's forward puts them.

Static int8 folds a BatchNorm into the conv whose output it normalizes (Jacob et al. 2018, section 3.2), so
the integer conv computes both. A Sequential shows the pair by position; a residual block calls
``self.bn1(self.conv1(x))`` in its ``forward``, which only the traced graph shows. :func:`conv_batchnorm_pairs`
reads the pairs from the torch.fx graph (a BatchNorm whose input is a conv output used by nothing else), and
falls back to Sequential positions when the model cannot be traced.
"""

from __future__ import annotations

from torch import nn


def _sequential_pairs(module: nn.Module) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for seq_name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                prefix = f"{seq_name}." if seq_name else ""
                pairs[prefix + cname] = prefix + bname
    return pairs


def conv_batchnorm_pairs(module: nn.Module) -> dict[str, str]:
    """``{conv name: batchnorm name}`` for every BatchNorm2d applied to the output of one Conv2d alone (the
    conv's output has no other use and each module is called once), so folding the BatchNorm into the conv
    and removing it computes the same function."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: positions in Sequentials
        return _sequential_pairs(module)
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = str(source.target), str(node.target)
        if (isinstance(modules.get(conv), nn.Conv2d) and len(source.users) == 1 and calls[conv] == 1
                and calls[bn] == 1):
            pairs[conv] = bn
    return pairs

"""The report of one .dsq artifact: per-layer bytes and representation, per-layer output error against the
uncompressed model, the stage table and the coverage table (when the manifest has one)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deepsqueeze.codec.format import tensor_payload_bytes
from deepsqueeze.report.html import Page

if TYPE_CHECKING:
    from deepsqueeze.zoo.resolve import ModelCode


def layer_bytes(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Module name -> {bytes, tensors, encodings} from the manifest's tensor segments (payload bytes)."""
    layers: dict[str, dict[str, Any]] = defaultdict(lambda: {"bytes": 0, "tensors": [], "encodings": set()})
    sizes = tensor_payload_bytes(manifest)
    for entry in manifest["tensors"]:
        module, _, tensor = entry["name"].rpartition(".")
        row = layers[module or "(root)"]
        row["bytes"] += sizes[entry["name"]]
        row["tensors"].append(tensor)
        row["encodings"].add(entry["encoding"])
    return dict(layers)


@torch.no_grad()
def layer_output_errors(compressed: nn.Module, reference: nn.Module, inputs: Any) -> dict[str, float | None]:
    """Relative L2 error ``||y - y_ref|| / ||y_ref||`` of every leaf module's output on ``inputs``.

    Modules are matched by name; None where the shapes differ (structured pruning changed the layer).
    """
    outputs: dict[str, dict[str, torch.Tensor]] = {"c": {}, "r": {}}

    def hook(tag: str, name: str):  # type: ignore[no-untyped-def]
        def fn(_module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs[tag][name] = (out.dequantize() if out.is_quantized else out).detach().float()

        return fn

    handles = []
    for tag, module in (("c", compressed), ("r", reference)):
        for name, sub in module.named_modules():
            if name and not any(True for _ in sub.children()):
                handles.append(sub.register_forward_hook(hook(tag, name)))
    try:
        for module in (compressed, reference):
            module.eval()
            if isinstance(inputs, dict):
                module(**inputs)
            else:
                module(inputs)
    finally:
        for h in handles:
            h.remove()
    errors: dict[str, float | None] = {}
    for name, ref in outputs["r"].items():
        out = outputs["c"].get(name)
        if out is None or out.shape != ref.shape:
            errors[name] = None
            continue
        errors[name] = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    return errors


def artifact_report(path: str | Path, data_ref: str | None = None, samples: int = 256, *,
                    model_code: ModelCode = None, weights: str | None = None, device: str = "cpu") -> str:
    """The HTML page for one artifact (output errors on ``samples`` inputs of ``data_ref`` or the model's data).

    ``model_code`` (and ``weights``) rebuild a ``py:`` model's architecture (and its uncompressed weights, the
    reference for the output errors); ``device`` is where both models run."""
    import plotly.graph_objects as go

    from deepsqueeze.artifact import load
    from deepsqueeze.codec.format import read_manifest
    from deepsqueeze.data import resolve_data
    from deepsqueeze.errors import DeepsqueezeError, one_line
    from deepsqueeze.zoo.resolve import base_reference

    manifest, _, size = read_manifest(path)
    model = load(path, model_code)
    model.module.to(device)
    fp32 = 4 * int(manifest["base_params"])
    page = Page(f"deepsqueeze artifact: {Path(path).name}",
                f"{manifest.get('ref')} · {size:,} bytes on disk · fp32 {fp32:,} bytes · "
                f"{fp32 / size:.2f}x smaller · {manifest.get('creator', '')}")
    per_layer = layer_bytes(manifest)
    modules = dict(model.module.named_modules())
    rows = []
    for name, row in sorted(per_layer.items(), key=lambda kv: -kv[1]["bytes"]):
        rows.append({"layer": name, "representation": type(modules[name]).__name__ if name in modules else "-",
                     "bytes": row["bytes"], "share": row["bytes"] / max(size, 1),
                     "tensors": ", ".join(row["tensors"]), "encodings": ", ".join(sorted(row["encodings"]))})

    page.heading("Bytes per layer")
    top = rows[:30][::-1]
    fig = go.Figure(go.Bar(x=[r["bytes"] for r in top], y=[f"{r['layer']} ({r['representation']})" for r in top],
                           orientation="h", marker={"color": "#2f6fd0"}))
    fig.update_layout(title="payload bytes per layer (largest 30)", xaxis_title="bytes", height=140 + 24 * len(top))
    page.figure(fig, "layer-bytes")
    page.table(rows, left=("layer", "representation", "tensors", "encodings"))

    page.heading("Output error per layer")
    reference = None
    try:
        if model.base.get("kind") == "py" and isinstance(model_code, str):  # the code the user named
            from deepsqueeze.resolve import resolve_model

            reference = resolve_model(model_code, weights=weights, progress=False)
            page.note(f"reference: {model_code}" + (f" with {weights}" if weights else " (its own initial weights)"))
        else:
            reference = base_reference(model)  # from the validated base, never the manifest's free-text ref
        reference.module.to(device)
    except DeepsqueezeError as exc:  # a py: base (no code named), a zoo model not trained here, ...
        page.note(f"the uncompressed model could not be rebuilt here ({one_line(exc)}): no output error", warn=True)
    if reference is not None:
        data_name = data_ref or manifest.get("base", {}).get("data")
        if model.task.is_text:  # every text model tokenizes its own inputs
            data = resolve_data(data_ref or "pydoc-sentences:eval")
            sentences = list(data.sentences[:samples])  # type: ignore[union-attr]
            inputs: Any = {k: v for k, v in model.module.tokenize(sentences).items()}  # type: ignore[operator]
            data_name = data.name
        elif data_name:
            data = resolve_data(data_name)
            inputs = data.test_x[:samples]  # type: ignore[union-attr]
        else:
            inputs = torch.randn(samples, *(manifest.get("input_shape") or [1, 28, 28]),
                                 generator=torch.Generator().manual_seed(0))
            data_name = "seeded random inputs"
        errors = layer_output_errors(model.module, reference.module, inputs)
        shown = [(n, e) for n, e in errors.items() if e is not None]
        fig = go.Figure(go.Bar(x=[n for n, _ in shown], y=[e for _, e in shown], marker={"color": "#d0804a"}))
        fig.update_layout(title=f"relative L2 error of each layer's output vs the uncompressed model "
                          f"({len(inputs) if not isinstance(inputs, dict) else len(sentences)} inputs of "
                          f"{data_name})", yaxis_title="||y - y_fp32|| / ||y_fp32||", xaxis_title="layer",
                          height=420)
        fig.update_xaxes(type="category")
        page.figure(fig, "layer-error")
        page.table([{"layer": n, "relative_error": e, "note": "" if e is not None else "shape differs"}
                    for n, e in errors.items()], left=("layer", "note"))

    page.heading("Stages")
    page.table([{"#": i + 1, **_compact(stage)} for i, stage in enumerate(manifest.get("stages", []))],
               left=("type",))
    coverage = manifest.get("coverage")
    if coverage:
        page.heading("Coverage")
        page.table(coverage, left=("stage_type", "module", "kind", "action", "into", "reason"))
    return page.render()


def _compact(stage: dict[str, Any]) -> dict[str, Any]:
    from deepsqueeze.search.front import compact_recipe

    try:
        return compact_recipe({"stages": [stage]})["stages"][0]
    except Exception:  # an unknown stage type from a newer deepsqueeze: show it as stored
        return stage

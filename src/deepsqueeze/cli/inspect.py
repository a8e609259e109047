"""``deepsqueeze inspect MODEL``: parameters, size, layers and (for artifacts) how each tensor is stored."""

from __future__ import annotations

from collections import Counter
from typing import Any

import typer

from deepsqueeze.cli._common import (
    DataOption,
    DeviceOption,
    JsonOption,
    ModelCodeOption,
    ModelOption,
    ThreadsOption,
    WeightsOption,
    emit_json,
    kv_table,
    model_ref,
    rows_table,
    stdout,
    use_threads,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def inspect(
        model_arg: str = typer.Argument(None, metavar="[MODEL]", help="Model reference: zoo:NAME[@DATA], minilm, "
                                        "hf:DIR, py:mod:fn, FILE.dsq (or --model)"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Show a model's parameters, size and layers, or an artifact's manifest."""
        from deepsqueeze.core.counting import count_nonzero_params, count_params
        from deepsqueeze.resolve import resolve_model

        model = model_ref(model_arg, model)
        use_threads(threads)
        m = resolve_model(model, weights=weights, progress=not as_json, model_code=model_code, device=device)
        if data:
            from deepsqueeze.data import resolve_data
            from deepsqueeze.recipes.run import fit_to_data

            fit_to_data(m, resolve_data(data, split="eval"), device)
        layers = Counter(type(mod).__name__ for name, mod in m.module.named_modules() if name and not list(mod.children()))
        info: dict[str, Any] = {
            "model": model,
            "base": m.base,
            "task": m.task.value,
            "params": count_params(m.module),
            "nonzero_params": count_nonzero_params(m.module),
            "fp32_bytes": 4 * m.base_params,
            "base_params": m.base_params,
            "input_shape": list(m.input_shape) if m.input_shape else None,
            "num_classes": m.num_classes,
            "layers": dict(sorted(layers.items())),
        }
        manifest = m.meta.get("manifest")
        if manifest is not None:
            size = m.meta["artifact_bytes"]
            info.update(
                artifact_bytes=size,
                compression_ratio=4 * m.base_params / size,
                format_version=manifest["version"],
                creator=manifest.get("creator"),
                transforms=manifest["transforms"],
                stages=manifest.get("stages", []),
                tensors=[
                    {"name": t["name"], "dtype": t["dtype"], "shape": t["shape"], "encoding": t["encoding"],
                     "bytes": sum(seg[1] for seg in t["segments"])}
                    for t in manifest["tensors"]
                ],
            )
        if as_json:
            emit_json(info)
            return
        stdout.print(kv_table(f"{model}", info))
        stdout.print(rows_table("layers", [{"layer": k, "count": v} for k, v in info["layers"].items()]))
        if manifest is not None:
            stdout.print(rows_table("stored tensors", info["tensors"]))

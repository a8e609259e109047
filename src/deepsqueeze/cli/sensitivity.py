"""``deepsqueeze sensitivity MODEL --data DATA``: per-layer pruning sensitivity curves (table or JSON)."""

from __future__ import annotations

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
    model_ref,
    need_data,
    stdout,
    use_threads,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def sensitivity(
        model_arg: str = typer.Argument(None, metavar="[MODEL]", help="Model reference or FILE.dsq (or --model)"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        sparsities: str = typer.Option("0.3,0.5,0.7,0.8,0.9,0.95", "--sparsities",
                                       help="Comma-separated sparsities to try on each layer alone"),
        target: float = typer.Option(None, "--target", help="Global sparsity to turn into per-layer sparsities"),
        limit: int = typer.Option(2000, "--limit", help="Evaluation samples (images) or sentences per point"),
        include: list[str] = typer.Option(None, "--include", help="Only layers matching these patterns"),
        exclude: list[str] = typer.Option(None, "--exclude", help="Skip layers matching these patterns"),
        as_json: bool = JsonOption,
    ) -> None:
        """Prune each Linear/Conv layer alone to each sparsity and report the metric curve per layer."""
        from deepsqueeze.errors import RecipeError
        from deepsqueeze.prune.sensitivity import allocate_sparsity, sensitivity_scan
        from deepsqueeze.prune.unstructured import prunable_weights
        from deepsqueeze.resolve import resolve_model

        try:
            grid = [float(s) for s in sparsities.split(",") if s.strip()]
        except ValueError:
            raise RecipeError(f"--sparsities must be comma-separated numbers, got {sparsities!r}") from None
        model = model_ref(model_arg, model)
        data = need_data(data, "sensitivity")
        use_threads(threads)
        m = resolve_model(model, weights=weights, progress=not as_json, model_code=model_code, device=device)
        metric, metric_name = _metric(m, data, limit)
        curves = sensitivity_scan(m.module, metric, grid, include=include or None, exclude=exclude or None)
        result: dict = {"model": model, "data": data, "metric": metric_name,
                        "curves": {name: [{"sparsity": s, metric_name: round(v, 5)} for s, v in curve]
                                   for name, curve in curves.items()}}
        if target is not None:
            sizes = {name.removesuffix(".weight"): p.numel() for name, p in prunable_weights(m.module).items()}
            plan = allocate_sparsity(curves, sizes, target)
            reached = sum(plan[n] * sizes[n] for n in plan) / sum(sizes[n] for n in plan)
            result.update(target=target, per_layer=plan, reached=round(reached, 4))
        if as_json:
            emit_json(result)
            return
        from rich.table import Table

        table = Table(title=f"{model}: {metric_name} with one layer pruned", title_justify="left")
        table.add_column("layer")
        for s, _ in next(iter(curves.values())):
            table.add_column(f"{s:.0%}", justify="right")
        if target is not None:
            table.add_column(f"plan for {target:.0%}", justify="right")
        for name, curve in curves.items():
            cells = [f"{v:.4f}" for _, v in curve]
            if target is not None:
                cells.append(f"{result['per_layer'][name]:.3f}")
            table.add_row(name, *cells)
        stdout.print(table)
        if target is not None:
            stdout.print(f"overall sparsity of the plan: {result['reached']:.4f}")


def _metric(model, data_ref: str, limit: int):  # type: ignore[no-untyped-def]
    """Accuracy on ``limit`` test images; on ``limit`` sentences, the unpruned model's perplexity over the
    pruned one's (causal LMs), else the mean cosine to the unpruned outputs."""
    import torch

    from deepsqueeze.data import resolve_data
    from deepsqueeze.data.datasets import ClassificationData, TextData
    from deepsqueeze.errors import DataError
    from deepsqueeze.eval import accuracy
    from deepsqueeze.recipes.run import fit_to_data

    data = resolve_data(data_ref)
    fit_to_data(model, data)
    if isinstance(data, ClassificationData):
        if model.task.value != "classifier":
            raise DataError(f"{data_ref} is image data but {model.ref} is a sentence encoder: pass sentences")
        subset = ClassificationData(data.name, data.train_x[:1], data.train_y[:1], data.test_x[:limit],
                                    data.test_y[:limit], data.num_classes)
        return (lambda module: accuracy(module, subset)), "accuracy"
    if isinstance(data, TextData):
        sentences = list(data.sentences[:limit])
        if model.task.value == "causal-lm":
            from deepsqueeze.eval.metrics import perplexity

            base, _ = perplexity(model.module, sentences)
            return (lambda module: base / perplexity(module, sentences)[0]), "perplexity_ratio"
        encode = model.module.encode
        reference = encode(sentences)

        def cosine(module: torch.nn.Module) -> float:
            emb = encode(sentences)
            return float(torch.nn.functional.cosine_similarity(emb, reference, dim=-1).mean())

        return cosine, "cosine_mean"
    raise DataError(f"sensitivity needs image data or sentences, not {data_ref}")

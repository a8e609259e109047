"""``deepsqueeze evaluate MODEL --data DATA``: quality, size and latency under stable JSON keys."""

from __future__ import annotations

import typer

from deepsqueeze.cli._common import (
    MAX_BATCH,
    BackendOption,
    DataOption,
    DeviceOption,
    JsonOption,
    ModelCodeOption,
    ModelOption,
    PreferOption,
    ThreadsOption,
    WeightsOption,
    emit_json,
    kernels_line,
    kv_table,
    model_ref,
    need_data,
    on_backend,
    stderr,
    stdout,
    use_prefer,
    use_threads,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        model_arg: str = typer.Argument(None, metavar="[MODEL]", help="Model reference or FILE.dsq (or --model)"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        prefer: str = PreferOption,
        reference: str = typer.Option(None, "--reference", help="Reference model for sentence encoders "
                                      "(default: the artifact's base model)"),
        batch_size: int = typer.Option(64, "--batch-size", min=1, max=MAX_BATCH, help="Batch size for the latency measurement"),
        no_latency: bool = typer.Option(False, "--no-latency", help="Skip the latency measurement"),
        baseline: str = typer.Option(None, "--baseline", help="Model timed interleaved with this one for the "
                                     "speedup (default for FILE.dsq: its base model)"),
        no_baseline: bool = typer.Option(False, "--no-baseline", help="Time this model alone (no speedup)"),
        backend: str = BackendOption,
        window: int = typer.Option(None, "--window", min=2, max=1 << 20, help="Causal LMs: tokens per perplexity "
                                   "window (default 512, at most the model's context)"),
        stride: int = typer.Option(None, "--stride", min=1, max=1 << 20, help="Causal LMs: tokens between window "
                                   "ends (default half the window)"),
        as_json: bool = JsonOption,
    ) -> None:
        """Score a model: accuracy, embedding fidelity or perplexity (beside its base's, with next-token and
        greedy agreement), parameters, bytes, compression ratio, latency."""
        from deepsqueeze.data import resolve_data
        from deepsqueeze.errors import DeepsqueezeError
        from deepsqueeze.eval import evaluate as run_evaluation
        from deepsqueeze.resolve import resolve_model

        model = model_ref(model_arg, model)
        data = need_data(data, "evaluate")
        threads = use_threads(threads)
        use_prefer(prefer)
        m = resolve_model(model, weights=weights, progress=not as_json, device=device, model_code=model_code)
        dataset = resolve_data(data, split="eval")
        ref = (resolve_model(reference, progress=not as_json, device=device, model_code=model_code)
               if reference else None)
        from deepsqueeze.recipes.run import fit_to_data

        fit_to_data(m, dataset, device)  # a py: classifier without input_shape takes it from --data
        m = on_backend(m, backend, threads, dataset)
        base = None
        if not no_latency and not no_baseline:
            if baseline:
                base = resolve_model(baseline, progress=not as_json, device=device, model_code=model_code)
            elif m.artifact_path:
                from deepsqueeze.errors import one_line
                from deepsqueeze.zoo.resolve import base_reference

                try:  # rebuilt from the validated base, never from the manifest's free-text ref
                    base = ref or base_reference(m)
                    base.module.to(device)
                except DeepsqueezeError as exc:
                    base = None
                    stderr.print(f"no speedup: {one_line(exc)}; pass --baseline REF to time against it",
                                 markup=False, highlight=False)
        result = run_evaluation(m, dataset, ref, batch_size=batch_size, threads=threads,
                                latency=not no_latency, device=device, baseline=base, window=window,
                                stride=stride)
        result["backend"] = backend
        if as_json:
            emit_json(result)
        else:
            stdout.print(kv_table(f"{model} on {dataset.name}", result))
            if result.get("kernels"):
                stdout.print(f"kernels ({result['prefer']}): {kernels_line(result['kernels'])}", markup=False,
                             highlight=False)
            if result["latency_reliable"] is False:
                stderr.print(f"[yellow]latency figures are unreliable: {result['latency_note']}; "
                             "rerun on a quiet machine before trusting the speedup[/yellow]")

"""``deepsqueeze train zoo:NAME --data DATA``: train a zoo model with its fixed recipe and seed."""

from __future__ import annotations

import time

import typer

from deepsqueeze.cli._common import DeviceOption, JsonOption, emit_json, kv_table, stderr, stdout


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        model: str = typer.Argument(..., help="zoo:NAME (lenet300, lenet5, vgg-small)"),
        data: str = typer.Option(..., "--data", help="fashion-mnist, fashion-mnist:DIR or digits"),
        epochs: float = typer.Option(None, "--epochs", help="override the zoo recipe's epoch count"),
        force: bool = typer.Option(False, "--force", help="retrain even when zoo:NAME@DATA is already cached"),
        device: str = DeviceOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Train a zoo model deterministically, cache it (as zoo:NAME@DATA) and report test accuracy.

        A model already in the cache is not retrained (it is reported as cached) unless --force.
        """

        from safetensors.torch import save

        from deepsqueeze.core.counting import count_params
        from deepsqueeze.core.files import atomic_write
        from deepsqueeze.data import ClassificationData, resolve_data
        from deepsqueeze.errors import DataError, ModelError
        from deepsqueeze.eval.metrics import accuracy
        from deepsqueeze.zoo import ZOO
        from deepsqueeze.zoo.pretrained import checkpoint_path, train_zoo_model

        name = model.removeprefix("zoo:").partition("@")[0]
        if not model.startswith("zoo:") or name not in ZOO:
            raise ModelError(f"train takes a zoo model (zoo:{', zoo:'.join(ZOO)}), got {model!r}")
        dataset = resolve_data(data)
        if not isinstance(dataset, ClassificationData):
            raise DataError(f"zoo models train on image data (fashion-mnist, digits), not {data}")
        cached = checkpoint_path(name, data)
        if epochs is None and cached.exists() and not force:
            from deepsqueeze.zoo.pretrained import pretrained_zoo_model

            module = pretrained_zoo_model(name, data, progress=False).module
            result = {"model": f"zoo:{name}@{data}", "cached": True, "checkpoint": str(cached),
                      "params": count_params(module), "accuracy": accuracy(module, dataset)}
            if as_json:
                emit_json(result)
            else:
                stderr.print(f"zoo:{name}@{data} is already trained and cached at {cached}: "
                             "nothing to do (--force retrains)")
                stdout.print(kv_table(f"cached {result['model']}", result))
            return
        start = time.perf_counter()
        module = train_zoo_model(name, dataset, progress=not as_json, device=device, epochs=epochs)
        seconds = time.perf_counter() - start
        result = {
            "model": f"zoo:{name}@{data}",
            "params": count_params(module),
            "epochs": epochs if epochs is not None else ZOO[name].epochs,
            "accuracy": accuracy(module, dataset),
            "train_s": round(seconds, 1),
            "cached": False,
        }
        if epochs is None:  # only the standard recipe goes into the cache that zoo:NAME@DATA reads
            path = checkpoint_path(name, data)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = save({k: v.contiguous() for k, v in module.state_dict().items()})
            atomic_write(path, lambda fh: fh.write(payload))
            result["checkpoint"] = str(path)
        if as_json:
            emit_json(result)
        else:
            stdout.print(kv_table(f"trained {result['model']}", result))

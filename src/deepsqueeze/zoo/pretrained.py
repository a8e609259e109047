"""Zoo models trained deterministically on a dataset and cached as safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.files import atomic_write
from deepsqueeze.core.model import Model, Task, load_state_checked
from deepsqueeze.data.datasets import ClassificationData
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import DataError, ModelError, one_line
from deepsqueeze.train.loop import seed_everything, train_classifier
from deepsqueeze.zoo.builders import ZOO, build_zoo_model

ZOO_SEED = 0
ZOO_RECIPE_VERSION = 2  # 2: at least MIN_TRAINING_STEPS
MIN_TRAINING_STEPS = 600  # on small data (digits: 11 steps per epoch) the zoo's epochs leave a model undertrained


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPSQUEEZE_CACHE") or Path.home() / ".cache" / "deepsqueeze")


def checkpoint_path(name: str, data_ref: str) -> Path:
    safe = data_ref.replace("/", "_").replace(":", "_")
    return cache_dir() / "zoo" / f"{name}@{safe}-v{ZOO_RECIPE_VERSION}.safetensors"


def train_zoo_model(name: str, data: ClassificationData, progress: bool = True,
                    device: str | torch.device = "cpu", epochs: float | None = None) -> torch.nn.Module:
    """Train zoo model ``name`` on ``data`` with its fixed recipe and seed: its epochs, but at least
    :data:`MIN_TRAINING_STEPS` optimizer steps (unless ``epochs`` is given)."""
    entry = ZOO[name]
    seed_everything(ZOO_SEED)
    module = build_zoo_model(name, data.input_shape, data.num_classes)
    if epochs is None:
        steps_per_epoch = -(-len(data.train_x) // entry.batch_size)
        epochs = max(entry.epochs, -(-MIN_TRAINING_STEPS // steps_per_epoch))
    train_classifier(
        module, data, epochs=epochs, lr=entry.lr, batch_size=entry.batch_size,
        optimizer=entry.optimizer, schedule=entry.schedule, weight_decay=entry.weight_decay,
        device=device, seed=ZOO_SEED, progress=progress,
    )
    return module.cpu().eval()


def pretrained_zoo_model(name: str, data_ref: str, progress: bool = True,
                         device: str | torch.device = "cpu") -> Model:
    data = resolve_data(data_ref)
    if not isinstance(data, ClassificationData):
        raise DataError(f"zoo:{name}@{data_ref}: zoo models train on image data, not on {data_ref}")
    from safetensors.torch import load_file, save

    path = checkpoint_path(name, data_ref)
    module = build_zoo_model(name, data.input_shape, data.num_classes)
    if path.exists():
        try:
            state = load_file(str(path))
        except Exception as exc:  # a damaged cache entry is reported, not trusted
            raise ModelError(f"cached checkpoint {path} is unreadable ({one_line(exc, 300)}): delete it to retrain"
                             ) from None
        try:
            load_state_checked(module, state, f"cached checkpoint {path}")
        except ModelError as exc:
            raise ModelError(f"{exc}: delete it to retrain") from None
    else:
        module = train_zoo_model(name, data, progress=progress, device=device)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = save({k: v.contiguous() for k, v in module.state_dict().items()})
        atomic_write(path, lambda fh: fh.write(payload))
    base = {"kind": "zoo", "name": name, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "data": data_ref}
    return Model(module.eval(), base, Task.CLASSIFIER, f"zoo:{name}@{data_ref}", count_params(module),
                 data.input_shape, data.num_classes, meta={"checkpoint": str(path)})

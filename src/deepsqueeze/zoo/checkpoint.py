"""Read the tensors of a Hugging Face directory's safetensors checkpoint by name, a few at a time.

A directory holds either ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Nothing is read until asked for; pickled checkpoints
(``pytorch_model.bin``) are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepsqueeze.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardedCheckpoint:
    """The tensor names of a safetensors checkpoint and a reader for any subset of them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.shard_of = {str(k): str(v) for k, v in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"{index} is not a valid safetensors index ({type(exc).__name__}): "
                                 "re-save the model with save_pretrained") from None
            for shard in set(self.shard_of.values()):
                if Path(shard).name != shard or not (self.folder / shard).is_file():
                    raise ModelError(f"{index} names shard {shard!r}, which is not a file in {self.folder}")
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as fh:
                self.shard_of = {name: SINGLE for name in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            raise ModelError(f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX}): "
                             "save the model with save_pretrained(safe_serialization=True)")

    def names(self) -> list[str]:
        return list(self.shard_of)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, from the shard headers (no tensor data is read)."""
        from safetensors import safe_open

        out: dict[str, list[int]] = {}
        for shard in sorted(set(self.shard_of.values())):
            with safe_open(str(self.folder / shard), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    out[name] = list(fh.get_slice(name).get_shape())
        return out

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype``), opening each shard once."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.shard_of:
                raise ModelError(f"the checkpoint in {self.folder} has no tensor {name!r}")
            by_shard.setdefault(self.shard_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, wanted in sorted(by_shard.items()):
            with safe_open(str(self.folder / shard), framework="pt") as fh:
                for name in wanted:
                    tensor = fh.get_tensor(name)
                    out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return out

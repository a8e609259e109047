"""Training on several processes (torchrun, gloo) gives one process's result up to float rounding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepsqueeze as ds
from deepsqueeze.train.distributed import shard

RECIPE = """
stages:
  - type: finetune
    epochs: 1
    lr: 0.001
    batch_size: 64
    limit: 512
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_the_batch_and_weights_average_to_one() -> None:
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = [shard((x, y), rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x)
    assert torch.equal(torch.cat([p[0][1] for p in parts]), y)
    assert sum(w for _, w in parts) / 2 == pytest.approx(1.0)
    batch = {"input_ids": torch.ones(1, 3), "attention_mask": torch.ones(1, 3)}
    assert shard(batch, 1, 2) == (batch, 1.0)  # fewer samples than processes: every process takes it whole


def test_two_processes_match_one(tmp_path: Path, fashion_mnist: object) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["compress", "--model", "zoo:lenet300", "--data", "fashion-mnist", "--recipe", str(recipe), "--json"]
    single = subprocess.run([sys.executable, "-m", "deepsqueeze", *args, "--out", str(tmp_path / "one.dsq")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "deepsqueeze", *args, "--out", str(tmp_path / "two.dsq")],
        capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert multi.stdout.count('"artifact_bytes"') == 1  # only rank 0 reports
    one, two = ds.load(tmp_path / "one.dsq").module, ds.load(tmp_path / "two.dsq").module
    before = ds.resolve_model("zoo:lenet300").module.state_dict()
    for name, tensor in one.state_dict().items():
        assert not torch.equal(tensor, before[name])  # it trained
        torch.testing.assert_close(two.state_dict()[name], tensor, atol=2e-5, rtol=1e-4)

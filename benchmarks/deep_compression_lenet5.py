"""Deep Compression of Caffe's LeNet-5 on Fashion-MNIST (shares the driver of ``deep_compression.py``)."""

from __future__ import annotations

from typing import Any

from benchmarks.deep_compression import run_deep_compression
from benchmarks.runner import BenchContext

NAME = "deep-compression-lenet5"
TITLE = "Deep Compression of LeNet-5: pruning, weight sharing, entropy coding (>= 45x, compress < 10 s)"
SETUP = (
    "zoo:lenet5@fashion-mnist (fp32, trained by the zoo) compressed with recipes/deep-compression-lenet5.yaml: "
    "AGP pruning to 35/88/95/80% (conv1, conv2, fc1, fc2) over 4 epochs of Adam fine-tuning (lr 1e-3, cosine); "
    "k-means weight sharing (linear init, Lloyd), 8 bits for the convolutions, 5 bits for the fully-connected "
    "layers and the biases; 2 epochs of centroid fine-tuning (Adam, lr 1e-4); then entropy coding as for "
    "LeNet-300-100. `bytes` is the whole .dsq file after each stage; accuracy on the full 10k test split after a "
    "save/load round trip; `compress_s` = clustering + writing the coded file (fine-tuning excluded), 2 threads."
)
MODEL = "zoo:lenet5@fashion-mnist"
RECIPE = "deep-compression-lenet5.yaml"


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    return run_deep_compression(ctx, MODEL, RECIPE, 45.0, 0.5, 10.0)

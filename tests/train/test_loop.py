"""The training loop's modes: dropout off for matching a fixed teacher."""

import torch
from torch import nn

from deepsqueeze.train.loop import fit


class Attention(nn.Module):
    """Reads ``self.training`` for a functional dropout, as Hugging Face attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.proj(x), p=0.5 if self.training else 0.0, training=self.training)


def test_dropout_off_trains_deterministically_and_keeps_batchnorm_training():
    net = nn.Sequential(Attention(), nn.Dropout(0.5), nn.BatchNorm1d(8))
    x = torch.randn(16, 8)
    seen = []

    def loss(m, batch):
        out = m(batch)
        seen.append((m[0].training, m[1].training, m[2].training))
        again = m(batch)
        assert torch.equal(out, again)  # no dropout noise left
        return out.pow(2).mean()

    fit(net, lambda epoch: [x], loss, steps_per_epoch=1, epochs=2, progress=False, dropout=False)
    assert seen == [(False, False, True)] * 2  # BatchNorm still updates its statistics
    assert not net.training  # eval afterwards, as always

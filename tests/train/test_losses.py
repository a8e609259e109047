"""Distillation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from deepsqueeze.train.losses import (
    HintAdapter,
    attention_loss,
    embedding_loss,
    hidden_state_loss,
    hint_loss,
    soft_target_loss,
)


def test_soft_target_loss_equals_the_hand_computed_value():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[2.0, 0.0, 0.0]])
    T, alpha = 2.0, 0.75
    ps = [math.exp(v / T) for v in (1.0, 0.0, -1.0)]
    pt = [math.exp(v / T) for v in (2.0, 0.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    logits = [1.0, 0.0, -1.0]
    ce = -(logits[2] - math.log(sum(math.exp(v) for v in logits)))  # label 2
    expected = alpha * T**2 * kl + (1 - alpha) * ce
    got = soft_target_loss(s, t, torch.tensor([2]), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert soft_target_loss(s, t, None, temperature=T).item() == pytest.approx(T**2 * kl, rel=1e-5)
    assert soft_target_loss(t, t, None).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_target_gradient_scale_is_temperature_invariant_at_high_t():
    # Hinton: with T^2 scaling, the soft-target gradient tends to (s - t) / N, independent of T.
    s = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.1, 0.2, -0.4]])
    grads = []
    for T in (50.0, 100.0):
        s.grad = None
        soft_target_loss(s, t, None, temperature=T).backward()
        grads.append(s.grad.clone())
    expected = ((s - t) - (s - t).mean()) / 3
    torch.testing.assert_close(grads[1], expected.detach(), atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-2)


def test_soft_target_validation():
    with pytest.raises(ValueError, match="temperature"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, alpha=1.5)


def test_hint_loss_uses_the_adapter_and_pools_to_the_smaller_map():
    adapter = HintAdapter(2, 3, conv=True)
    with torch.no_grad():
        adapter.proj.weight.zero_()
        adapter.proj.bias.fill_(1.0)
    s = torch.randn(2, 2, 8, 8)
    t = torch.full((2, 3, 4, 4), 3.0)
    assert hint_loss(s, t, adapter).item() == pytest.approx(4.0)  # (1 - 3)^2
    with pytest.raises(ValueError, match="hint shapes"):
        hint_loss(torch.randn(2, 5), torch.randn(2, 3))


def test_hidden_state_loss_ignores_padding_and_is_relative():
    t = torch.tensor([[[2.0, 0.0], [5.0, 5.0]]])  # second token is padding
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    # mse over the real token: ((1-2)^2 + 0) / 2 = 0.5; teacher mean square: (4 + 0) / 2 = 2.
    assert hidden_state_loss(s, t, mask).item() == pytest.approx(0.25)
    assert hidden_state_loss(10 * s, 10 * t, mask).item() == pytest.approx(0.25)


def test_attention_loss_is_the_kl_over_real_queries():
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    s = torch.tensor([[[[0.25, 0.75], [0.0, 1.0]]]])
    mask = torch.tensor([[1, 0]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_loss(s, t, mask).item() == pytest.approx(expected, rel=1e-5)
    assert attention_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_embedding_losses():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert embedding_loss(a, b).item() == pytest.approx(0.5)  # cos 0 and 1
    assert embedding_loss(a, b, "mse").item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="unknown embedding loss"):
        embedding_loss(a, b, "l1")

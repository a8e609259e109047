import torch

from deepsqueeze.primitives import fake_quant as FQ


def test_round_ste_rounds_forward_and_passes_gradients_straight_through():
    x = torch.tensor([0.2, 1.5, -2.7], requires_grad=True)
    y = FQ.round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_lsq_values_lie_on_the_grid_and_the_step_gets_lsqs_gradient():
    x = torch.tensor([0.26, -0.9, 5.0, -5.0, 0.04])
    s = torch.tensor(0.1, requires_grad=True)
    g = FQ.lsq_grad_scale(x.numel(), 7)
    y = FQ.lsq_fake_quantize(x, s, -8, 7, g=g)
    assert torch.allclose(y, torch.tensor([0.3, -0.8, 0.7, -0.8, 0.0]))
    y.sum().backward()
    v = x / 0.1
    inside = torch.clamp(v, -8, 7)
    expected = torch.where((v > -8) & (v < 7), torch.round(inside) - inside, inside).sum() * g
    assert torch.allclose(s.grad, expected, atol=1e-6)
    assert abs(g - 1 / (5 * 7) ** 0.5) < 1e-12


def test_lsq_passes_input_gradients_only_inside_the_range():
    x = torch.tensor([0.3, 2.0, -2.0], requires_grad=True)
    FQ.lsq_fake_quantize(x, torch.tensor(0.1), -8, 7).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_pact_clips_at_the_learned_level_and_learns_it_from_clipped_inputs():
    x = torch.tensor([0.1, 0.5, 3.0, 4.0, -1.0])
    alpha = torch.tensor(1.0, requires_grad=True)
    y = FQ.pact_fake_quantize(x, alpha, 15)
    assert y.max() == 1.0 and y.min() == 0.0
    assert torch.allclose(y * 15, torch.round(y * 15))
    y.sum().backward()
    assert alpha.grad == 2.0  # two inputs above alpha


def test_binary_and_ternary_levels_with_gradients():
    w = torch.tensor([[0.5, -0.2, 0.1, -0.4]], requires_grad=True)
    b = FQ.binary_ste(w)
    assert torch.allclose(b, torch.tensor([[1.0, -1.0, 1.0, -1.0]]) * 0.3)
    b.sum().backward()
    assert w.grad.abs().sum() > 0
    w2 = torch.tensor([[0.9, -0.05, 0.6, -0.8]], requires_grad=True)
    wp = torch.tensor([[0.7]], requires_grad=True)
    wn = torch.tensor([[0.5]], requires_grad=True)
    t = FQ.ternary_ste(w2, wp, wn)
    assert torch.allclose(t, torch.tensor([[0.7, 0.0, 0.7, -0.5]]))
    (t * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert wp.grad.item() == 4.0 and wn.grad.item() == -4.0  # TTQ: summed gradients of their positions
    assert torch.allclose(w2.grad, torch.tensor([[0.7, 2.0, 2.1, 2.0]]))  # times W_p, 1, W_n
    twn = FQ.ternary_ste(w2.detach())
    assert torch.allclose(twn, torch.tensor([[1.0, 0.0, 1.0, -1.0]]) * (0.9 + 0.6 + 0.8) / 3)


def test_dynamic_per_token_matches_symmetric_int8_rows():
    x = torch.randn(4, 16)
    y = FQ.dynamic_per_token_fake_quantize(x)
    scale = x.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(y, torch.round(x / scale) * scale)

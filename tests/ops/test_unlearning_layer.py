"""The unlearning-layer op: float64 gradcheck of the reference and an independent oracle."""

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.ops import unlearning_layer, unlearning_layer_reference


def params(d, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        out.append((torch.randn(r, d, generator=g, dtype=dtype), torch.randn(r, generator=g, dtype=dtype),
                    torch.randn(d, r, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)))
    return [list(t) for t in zip(*out)]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_matches_sum_of_layers(activation):
    x = torch.randn(37, 72, dtype=torch.float32)
    D, b, U, c = params(72, [5, 8, 3], dtype=torch.float32)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    expected = x.double().clone()
    for d_, b_, u_, c_ in zip(D, b, U, c):
        expected += act(x.double() @ d_.double().t() + b_.double()) @ u_.double().t() + c_.double()
    got = unlearning_layer(x, D, b, U, c, activation)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_reference_gradcheck(activation):
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    D, b, U, c = params(9, [2, 3])
    for t in D + b + U + c:
        t.requires_grad_(True)
    if activation == "relu":  # keep pre-activations away from the kink for finite differences
        with torch.no_grad():
            for bias in b:
                bias.add_(torch.sign(bias) * 0.5)

    def f(x, *flat):
        k = len(D)
        return unlearning_layer_reference(x, flat[:k], flat[k:2 * k], flat[2 * k:3 * k], flat[3 * k:], activation)

    assert torch.autograd.gradcheck(f, (x, *D, *b, *U, *c))


def test_keeps_input_dtype_and_shape():
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    D, b, U, c = params(16, [4], dtype=torch.float32)
    y = unlearning_layer(x, D, b, U, c)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_unknown_activation():
    D, b, U, c = params(4, [2], dtype=torch.float32)
    with pytest.raises(ValueError, match="activation"):
        unlearning_layer(torch.randn(3, 4), D, b, U, c, "tanh")

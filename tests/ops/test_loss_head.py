"""The chunked loss head against a float64, full-logits autograd oracle written here."""

import pytest
import torch

from unlearn_fast.ops import eul_loss_head, eul_loss_head_reference
from unlearn_fast.ops.loss_head import IGNORE_INDEX


def oracle(hs, ht, w, targets, kl_coef, ce_coef, bias=None, kl_bound=float("inf"), ce_bound=float("inf"),
           temperature=1.0, logit_scale=1.0, logit_softcap=None):
    """Unchunked float64 loss; autograd gives the gradients. The teacher is a constant."""
    def logits(h, w):
        z = h.double() @ w.double().t()
        if bias is not None:
            z = z + bias.double()
        z = z * logit_scale
        return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)

    s = logits(hs, w)
    T = temperature
    kl = torch.zeros(s.shape[0], dtype=torch.float64)
    if ht is not None:
        t = logits(ht, w.detach())
        pt = torch.softmax(t / T, -1)
        kl = T * T * (pt * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
    valid = targets != IGNORE_INDEX
    ce = -torch.log_softmax(s, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    kl_term = torch.where(kl_coef < 0, kl.clamp(max=kl_bound), kl)
    ce_term = torch.where(ce_coef < 0, ce.clamp(max=ce_bound), ce)
    return (kl_coef.double() * kl_term + ce_coef.double() * ce_term).sum(), kl, ce


def make(n, h, v, seed=0, noise=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ht = torch.randn(n, h, generator=g)
    hs = (ht + noise * torch.randn(n, h, generator=g)).to(dtype).requires_grad_(True)
    w = torch.randn(v, h, generator=g) / h ** 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    kl_coef = torch.randn(n, generator=g)
    ce_coef = torch.randn(n, generator=g)
    kl_coef[::7] = 0
    return hs, ht.to(dtype), w.to(dtype), targets, kl_coef, ce_coef


CASES = [
    dict(n=37, h=24, v=1271, chunk_rows=8),
    dict(n=41, h=13, v=401, chunk_rows=1024, temperature=2.0),
    dict(n=1, h=5, v=5, chunk_rows=1),
    dict(n=29, h=16, v=97, chunk_rows=7, kl_bound=0.3, ce_bound=3.0),
    dict(n=23, h=16, v=97, chunk_rows=5, logit_scale=0.7, logit_softcap=4.0, bias=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c['n']}_h{c['h']}_v{c['v']}")
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_matches_float64_oracle(case, backend, monkeypatch):
    if backend == "cpp":
        from unlearn_fast._ext import C

        if C is None:
            pytest.skip("C++ extension not built")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    case = dict(case)
    n, h, v = case.pop("n"), case.pop("h"), case.pop("v")
    hs, ht, w, targets, kl_coef, ce_coef = make(n, h, v)
    bias = torch.randn(v) if case.pop("bias", False) else None
    out = eul_loss_head(hs, ht, w, targets, kl_coef, ce_coef, bias=bias, **case)
    out.loss.backward(torch.tensor(1.7))
    case.pop("chunk_rows")
    hs64 = hs.detach().double().requires_grad_(True)
    ref, kl, ce = oracle(hs64, ht, w, targets, kl_coef, ce_coef, bias=bias, **case)
    (ref * 1.7).backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl.double(), kl.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)


def test_weight_gradient_when_head_trains():
    hs, ht, w, targets, kl_coef, ce_coef = make(19, 8, 33)
    w = w.clone().requires_grad_(True)
    out = eul_loss_head_reference(hs, ht, w, targets, kl_coef, ce_coef, chunk_rows=4)
    out.loss.backward()
    w64 = w.detach().double().requires_grad_(True)
    hs64 = hs.detach().double().requires_grad_(True)
    ref, _, _ = oracle(hs64, ht, w64, targets, kl_coef, ce_coef)
    ref.backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_student_equal_teacher_gives_zero_kl_and_its_gradient():
    """EUL starts at student == teacher: KL and its gradient must be exactly representable zeros."""
    hs, ht, w, targets, _, _ = make(16, 8, 50, noise=0.0)
    n = hs.shape[0]
    out = eul_loss_head(hs, ht, w, torch.full((n,), IGNORE_INDEX), torch.ones(n), torch.zeros(n))
    out.loss.backward()
    assert out.kl.abs().max() < 1e-6
    assert hs.grad.abs().max() < 1e-6


def test_no_teacher_means_no_kl():
    hs, _, w, targets, kl_coef, ce_coef = make(11, 8, 20)
    out = eul_loss_head(hs, None, w, targets, kl_coef, ce_coef)
    ref, _, ce = oracle(hs.detach(), None, w, targets, kl_coef, ce_coef)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out.kl == 0)


def test_capped_forget_term_stops_pushing():
    """A maximised (negative-coefficient) row past its bound contributes a constant: zero gradient."""
    hs, ht, w, _, _, _ = make(6, 8, 30, noise=3.0)
    n = hs.shape[0]
    targets = torch.full((n,), IGNORE_INDEX)
    free = eul_loss_head(hs, ht, w, targets, -torch.ones(n), torch.zeros(n))
    bound = float(free.kl.min()) / 2  # every row is past the bound
    capped = eul_loss_head(hs, ht, w, targets, -torch.ones(n), torch.zeros(n), kl_bound=bound)
    capped.loss.backward()
    assert torch.allclose(capped.loss, torch.tensor(-bound * n))
    assert hs.grad.abs().max() == 0


def test_bf16_hidden_states_keep_fp32_logit_accuracy():
    """bf16 inputs: the loss is computed from fp32 logits, so it matches fp64 on the same bf16 values."""
    hs, ht, w, targets, kl_coef, ce_coef = make(33, 16, 300, dtype=torch.bfloat16, noise=1e-2)
    out = eul_loss_head(hs, ht, w, targets, kl_coef, ce_coef, chunk_rows=10)
    out.loss.backward()
    hs64 = hs.detach().double().requires_grad_(True)
    ref, _, _ = oracle(hs64, ht, w, targets, kl_coef, ce_coef)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    assert hs.grad.dtype == torch.bfloat16
    rel = (hs.grad.double() - hs64.grad).norm() / hs64.grad.norm()
    assert rel < 1e-2


def test_shape_errors():
    hs, ht, w, targets, kl_coef, ce_coef = make(5, 4, 7)
    with pytest.raises(ValueError, match="head weight"):
        eul_loss_head(hs, ht, w[:, :3], targets, kl_coef, ce_coef)
    with pytest.raises(ValueError, match="targets"):
        eul_loss_head(hs, ht, w, targets[:3], kl_coef, ce_coef)

"""unlearn_fast._C.loss_rows (csrc/cpu/loss_rows.cpp) against a float64 PyTorch reference.

The reference below is written out here on purpose (independent of the package's own fp32
``loss_rows_reference``): it states the contract in float64 so the fp32 kernel can be held to it.
Skipped when ``_C`` is not built; CI builds it with UNLEARN_FAST_BUILD_EXT=1.
"""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_fast.ops.extension import C, C_ERROR

if C is None:
    pytest.skip(f"unlearn_fast._C is not live: {C_ERROR}", allow_module_level=True)

IGNORE = -100


# --------------------------------------------------------------------------------------------
# float64 reference of the contract
# --------------------------------------------------------------------------------------------
def reference_loss_rows(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound, T, guard=False):
    """(kl, ce, grad_logits, kl_weight) in float64.

    kl_i   = T² Σ_v p_t (log p_t − log p_s^T), p_t = softmax(t/T), p_s^T = softmax(s/T); 0 without teacher
    ce_i   = −log softmax(s)[target_i]; 0 where target_i == -100
    kl_weight_i = 0 if guard and kl_coef_i < 0 and row i has a target and a teacher and
                  log p_s^T[target_i] > log p_t[target_i]; else kl_coef_i
    grad_i = kl_weight_i·[kl active]·T·(softmax(s/T) − p_t) + ce_coef_i·[ce active]·(softmax(s) − onehot)
    where a term with a negative coefficient is active only while it is below its bound.
    """
    s = s.double()
    n, V = s.shape
    kl_coef, ce_coef = kl_coef.double(), ce_coef.double()
    grad = torch.zeros_like(s)
    kl = torch.zeros(n, dtype=torch.float64)
    has = targets != IGNORE
    safe = torch.where(has, targets, torch.zeros_like(targets))
    kl_weight = kl_coef.clone()
    if t.numel():
        t = t.double()
        log_ps_T = torch.log_softmax(s / T, dim=-1)
        log_pt = torch.log_softmax(t / T, dim=-1)
        pt = log_pt.exp()
        kl = T * T * (pt * (log_pt - log_ps_T)).sum(-1)
        if guard:
            sharper = log_ps_T.gather(1, safe[:, None]).squeeze(1) > log_pt.gather(1, safe[:, None]).squeeze(1)
            kl_weight[(kl_coef < 0) & has & sharper] = 0.0
        active = (kl_weight >= 0) | (kl < kl_bound)
        grad += (kl_weight * active)[:, None] * T * (log_ps_T.exp() - pt)
    log_ps = torch.log_softmax(s, dim=-1)
    ce = -log_ps.gather(1, safe[:, None]).squeeze(1) * has
    active = has & ((ce_coef >= 0) | (ce < ce_bound))
    onehot = torch.zeros_like(s).scatter_(1, safe[:, None], 1.0) * has[:, None]
    grad += (ce_coef * active)[:, None] * (log_ps.exp() - onehot)
    return kl, ce, grad, kl_weight


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def make_inputs(n, V, *, teacher=True, seed=0, scale=3.0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g) * scale
    # a few rows whose maximum sits in the last columns, so the online max is raised late
    s[::4, -1] += 4 * scale
    t = s + noise * torch.randn(n, V, generator=g) if teacher else torch.empty(0)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[1::3] = IGNORE
    choices_kl = torch.tensor([0.8, -1.0, 0.0, 0.3, -0.5])
    choices_ce = torch.tensor([1.0, -0.2, 0.0, 0.5])
    kl_coef = choices_kl[torch.randint(0, len(choices_kl), (n,), generator=g)]
    ce_coef = choices_ce[torch.randint(0, len(choices_ce), (n,), generator=g)]
    return s, t, targets, kl_coef, ce_coef


def bound_between(values: torch.Tensor) -> float:
    """A bound that splits ``values`` roughly in half and sits far from every value (so fp32 and
    fp64 agree on which rows are capped)."""
    v = torch.sort(values.double().unique()).values
    if v.numel() < 2:
        return float(v[0]) + 1.0 if v.numel() else 1.0
    gaps = v[1:] - v[:-1]
    mid = v.numel() // 2
    # the widest gap near the middle
    lo, hi = max(0, mid - 3), min(gaps.numel(), mid + 3)
    i = lo + int(torch.argmax(gaps[lo:hi]))
    return float((v[i] + v[i + 1]) / 2)


def check(n, V, T, *, teacher=True, seed=0, kl_bound=None, ce_bound=None, guard=False, **kw):
    s, t, targets, kl_coef, ce_coef = make_inputs(n, V, teacher=teacher, seed=seed, **kw)
    kl_ref0, ce_ref0, _, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, math.inf, math.inf, T)
    if kl_bound is None:
        kl_bound = bound_between(kl_ref0) if teacher else 1.0
    if ce_bound is None:
        ce_bound = bound_between(ce_ref0[targets != IGNORE]) if (targets != IGNORE).any() else 1.0
    kl, ce, grad, kl_weight = C.loss_rows(s, t, targets, kl_coef, ce_coef, kl_bound, ce_bound, T, guard)
    kl_ref, ce_ref, grad_ref, kl_weight_ref = reference_loss_rows(s, t, targets, kl_coef, ce_coef, kl_bound,
                                                                  ce_bound, T, guard)
    assert kl.dtype == ce.dtype == grad.dtype == kl_weight.dtype == torch.float32
    assert kl.shape == ce.shape == kl_weight.shape == (n,) and grad.shape == (n, V)
    assert torch.equal(kl_weight.double(), kl_weight_ref)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce.double(), ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-6)
    return s, t, targets, kl_coef, ce_coef, kl_ref, ce_ref, kl_bound, ce_bound


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("n,V", [(37, 1271), (1, 5), (3, 1), (5, 3000), (64, 97)])
@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "no_teacher"])
@pytest.mark.parametrize("guard", [False, True], ids=["", "guard"])
def test_matches_float64_reference(n, V, T, teacher, guard):
    check(n, V, T, teacher=teacher, seed=n * 1000 + V, guard=guard)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sharpening_guard_drops_the_kl_of_sharper_rows_only(T):
    """Forget rows (kl_coef < 0) where the student is more confident in the target than the
    teacher lose their KL term and keep their CE term; all other rows are untouched."""
    n, V = 40, 301
    g = torch.Generator().manual_seed(3)
    t = torch.randn(n, V, generator=g) * 2
    s = t + 0.5 * torch.randn(n, V, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    sharper = torch.arange(n) % 2 == 0
    s[sharper, targets[sharper]] += 3.0   # student more confident than the teacher on these
    s[~sharper, targets[~sharper]] -= 3.0
    kl_coef = torch.where(torch.arange(n) % 4 < 3, -1.0, 0.8)
    ce_coef = torch.full((n,), -0.2)
    kl, ce, grad, kl_weight = C.loss_rows(s, t, targets, kl_coef, ce_coef, 50.0, 50.0, T, True)
    dropped = sharper & (kl_coef < 0)
    assert dropped.any() and (~dropped & (kl_coef < 0)).any()
    assert torch.equal(kl_weight, torch.where(dropped, 0.0, kl_coef))
    _, _, grad_ce_only, _ = C.loss_rows(s, t, targets, torch.zeros(n), ce_coef, 50.0, 50.0, T)
    torch.testing.assert_close(grad[dropped], grad_ce_only[dropped])  # only the CE gradient is left
    _, _, grad_off, _ = C.loss_rows(s, t, targets, kl_coef, ce_coef, 50.0, 50.0, T, False)
    assert torch.equal(grad[~dropped], grad_off[~dropped])
    assert not torch.allclose(grad[dropped], grad_off[dropped])


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_caps_are_exercised(T):
    """The chosen bounds split the maximised rows: some capped (no gradient), some still active."""
    s, t, targets, kl_coef, ce_coef, kl_ref, ce_ref, kl_bound, ce_bound = check(37, 1271, T, seed=7)
    neg_kl = kl_coef < 0
    assert ((kl_ref > kl_bound) & neg_kl).any() and ((kl_ref < kl_bound) & neg_kl).any()
    # a row with only a capped KL term (and no CE term) has an all-zero gradient
    _, _, grad, _ = C.loss_rows(s, t, torch.full_like(targets, IGNORE), kl_coef, ce_coef, kl_bound, ce_bound, T)
    capped = neg_kl & (kl_ref > kl_bound)
    assert torch.count_nonzero(grad[capped]) == 0
    assert (grad[~capped & (kl_coef != 0)].abs().amax(dim=1) > 0).all()


def test_ce_cap():
    n, V = 16, 300
    s, t, targets, _, _ = make_inputs(n, V, seed=3)
    targets[:] = torch.arange(n) * 7
    ce_coef = torch.full((n,), -0.2)
    kl_coef = torch.zeros(n)
    _, ce_ref, _, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, math.inf, math.inf, 1.0)
    bound = bound_between(ce_ref)
    kl, ce, grad, _ = C.loss_rows(s, t, targets, kl_coef, ce_coef, math.inf, bound, 1.0)
    _, _, grad_ref, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, math.inf, bound, 1.0)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-6)
    above = ce_ref > bound
    assert above.any() and (~above).any()
    assert torch.count_nonzero(grad[above]) == 0


def test_kl_reported_with_zero_coefficient():
    s, t, targets, _, ce_coef = make_inputs(4, 50, seed=1)
    kl_coef = torch.zeros(4)
    kl, _, _, _ = C.loss_rows(s, t, targets, kl_coef, ce_coef, 1.0, 1.0, 2.0)
    kl_ref, _, _, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, 1.0, 1.0, 2.0)
    assert (kl > 0).all()
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_student_equal_teacher_is_exactly_zero(T):
    """EUL starts with student == teacher: KL and its gradient must be exactly 0, not rounding noise."""
    s, _, targets, _, _ = make_inputs(9, 777, teacher=False, seed=5)
    n = s.shape[0]
    kl, ce, grad, _ = C.loss_rows(s, s.clone(), targets, torch.full((n,), 0.8), torch.zeros(n), 5.0, 5.0, T)
    assert torch.equal(kl, torch.zeros(n))
    assert torch.count_nonzero(grad) == 0
    assert (ce[targets != IGNORE] > 0).all() and (ce[targets == IGNORE] == 0).all()


def test_tiny_kl_gradient_is_accurate():
    """Student = teacher + 1e-3 noise: the fp32 KL gradient still matches float64 closely."""
    g = torch.Generator().manual_seed(11)
    n, V = 8, 2048
    t = torch.randn(n, V, generator=g) * 3
    s = t + 1e-3 * torch.randn(n, V, generator=g)
    targets = torch.full((n,), IGNORE)
    kl_coef, ce_coef = torch.ones(n), torch.zeros(n)
    _, _, grad, _ = C.loss_rows(s, t, targets, kl_coef, ce_coef, 1.0, 1.0, 1.0)
    _, _, grad_ref, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, 1.0, 1.0, 1.0)
    rel = (grad.double() - grad_ref).norm() / grad_ref.norm()
    assert rel < 5e-4, rel  # the fp32 PyTorch reference gets ~3e-4 here, this kernel ~2e-4


def test_empty_batch():
    kl, ce, grad, kl_weight = C.loss_rows(
        torch.empty(0, 10), torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0),
        1.0, 1.0, 1.0,
    )
    assert kl.shape == ce.shape == kl_weight.shape == (0,) and grad.shape == (0, 10)


def test_torch_op_matches_pybind():
    args = make_inputs(6, 33, seed=2)
    for guard in (False, True):
        out_c = C.loss_rows(*args, 0.5, 0.5, 2.0, guard)
        out_op = torch.ops.unlearn_fast.loss_rows(*args, 0.5, 0.5, 2.0, guard)
        assert len(out_c) == len(out_op) == 4
        for a, b in zip(out_c, out_op):
            assert torch.equal(a, b)


def test_opcheck():
    """Schema, fake (Meta) kernel and dispatch of torch.ops.unlearn_fast.loss_rows."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    s, t, targets, kl_coef, ce_coef = make_inputs(5, 17, seed=4)
    opcheck(torch.ops.unlearn_fast.loss_rows.default, (s, t, targets, kl_coef, ce_coef, 0.5, 0.5, 2.0))
    opcheck(torch.ops.unlearn_fast.loss_rows.default, (s, torch.empty(0), targets, kl_coef, ce_coef, 0.5, 0.5, 1.0))
    opcheck(torch.ops.unlearn_fast.loss_rows.default, (s, t, targets, kl_coef, ce_coef, 0.5, 0.5, 1.0, True))


def test_agrees_with_package_reference():
    """The package's fp32 reference (the fallback backend) implements the same contract."""
    try:
        from unlearn_fast.ops.loss_head import loss_rows_reference
    except ImportError as err:  # pragma: no cover - the package is written alongside
        pytest.skip(f"unlearn_fast.ops.loss_head not importable: {err}")
    args = make_inputs(37, 1271, seed=9)
    for teacher in (args[1], torch.empty(0)):
        a = (args[0], teacher, *args[2:])
        for guard in (False, True):
            for x, y in zip(C.loss_rows(*a, 2.0, 3.0, 2.0, guard), loss_rows_reference(*a, 2.0, 3.0, 2.0, guard)):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------
def _good(n=4, V=9):
    return list(make_inputs(n, V, seed=0)) + [1.0, 1.0, 1.0]


def _with(i, value):
    args = _good()
    args[i] = value
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_with(0, torch.randn(4, 9, dtype=torch.float64)), "student_logits must be float32"),
        (_with(0, torch.randn(36)), "student_logits must be 2-D"),
        (_with(0, torch.randn(9, 4).t()), "student_logits must be contiguous"),
        (_with(0, torch.randn(4, 0)), "vocabulary dimension is empty"),
        (_with(1, torch.randn(4, 8)), "teacher_logits must have the shape"),
        (_with(1, torch.randn(4, 9).half()), "teacher_logits must be float32"),
        (_with(1, torch.randn(9, 4).t()), "teacher_logits must be contiguous"),
        (_with(2, torch.zeros(4, dtype=torch.int32)), "targets must be Long"),
        (_with(2, torch.zeros(3, dtype=torch.long)), r"targets must have shape \[4\]"),
        (_with(2, torch.tensor([0, 1, 9, 2])), r"targets\[2\] = 9 is outside \[0, 9\)"),
        (_with(2, torch.tensor([0, -1, 2, 2])), r"targets\[1\] = -1"),
        (_with(3, torch.ones(4, dtype=torch.float64)), "kl_coef must be Float"),
        (_with(4, torch.ones(5)), r"ce_coef must have shape \[4\]"),
        (_with(4, torch.ones(8)[::2]), "ce_coef must be contiguous"),
        (_with(7, 0.0), "temperature must be a positive finite number"),
        (_with(7, -1.0), "temperature must be a positive finite number"),
        (_with(7, float("nan")), "temperature must be a positive finite number"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(RuntimeError, match=match):
        C.loss_rows(*args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.unlearn_fast.loss_rows(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():  # pragma: no cover - runs on the GPU machine only
    from unlearn_fast.ops.extension import has_cuda_ops

    if not has_cuda_ops():
        pytest.skip("_C built without CUDA kernels")
    for teacher in (True, False):
        for T in (1.0, 2.0):
            s, t, targets, kl_coef, ce_coef = make_inputs(37, 1271, teacher=teacher, seed=3)
            kl_ref, ce_ref, _, _ = reference_loss_rows(s, t, targets, kl_coef, ce_coef, math.inf, math.inf, T)
            kb = bound_between(kl_ref) if teacher else 1.0
            cb = bound_between(ce_ref[targets != IGNORE])
            ref = reference_loss_rows(s, t, targets, kl_coef, ce_coef, kb, cb, T, True)
            dev = [x.cuda() for x in (s, t, targets, kl_coef, ce_coef)]
            out = C.loss_rows(*dev, kb, cb, T, True)
            for x, y in zip(out, ref):
                torch.testing.assert_close(x.cpu().double(), y, rtol=1e-4, atol=1e-5)
            out_op = torch.ops.unlearn_fast.loss_rows(*dev, kb, cb, T, True)
            for x, y in zip(out_op, out):
                torch.testing.assert_close(x, y)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "no_teacher"])
def test_inplace_variant_writes_the_gradient_over_the_student_logits(T, teacher):
    """loss_rows_inplace (the loss head's CPU chunk loop uses it) equals loss_rows exactly."""
    s, t, targets, kl_coef, ce_coef = make_inputs(23, 1031, teacher=teacher, seed=17)
    kl, ce, grad, kl_weight = C.loss_rows(s, t, targets, kl_coef, ce_coef, 0.7, 5.0, T, True)
    s2 = s.clone()
    kl2, ce2, kl_weight2 = C.loss_rows_inplace(s2, t, targets, kl_coef, ce_coef, 0.7, 5.0, T, True)
    assert torch.equal(kl, kl2) and torch.equal(ce, ce2) and torch.equal(grad, s2)
    assert torch.equal(kl_weight, kl_weight2)

"""The chunked loss head against a float64, full-logits autograd oracle written here."""

import importlib
import importlib.util
import os

import pytest
import torch

from conftest import run_triton_cases_under_interpreter
from unlearn_fast.ops import eul_loss_head, eul_loss_head_reference
from unlearn_fast.ops.loss_head import IGNORE_INDEX


def oracle(hs, ht, w, targets, kl_coef, ce_coef, bias=None, kl_bound=float("inf"), ce_bound=float("inf"),
           temperature=1.0, logit_scale=1.0, logit_softcap=None, sharpening_guard=False):
    """Unchunked float64 loss; autograd gives the gradients. The teacher is a constant. The guard
    drops the KL term of forget rows whose student gives the target a higher probability at T."""
    def logits(h, w):
        z = h.double() @ w.double().t()
        if bias is not None:
            z = z + bias.double()
        z = z * logit_scale
        return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)

    s = logits(hs, w)
    T = temperature
    kl = torch.zeros(s.shape[0], dtype=torch.float64)
    valid = targets != IGNORE_INDEX
    if ht is not None:
        t = logits(ht, w.detach())
        pt = torch.softmax(t / T, -1)
        kl = T * T * (pt * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
        if sharpening_guard:
            pick = targets.clamp(min=0).unsqueeze(-1)
            lp_s = torch.log_softmax(s.detach() / T, -1).gather(-1, pick).squeeze(-1)
            lp_t = torch.log_softmax(t / T, -1).gather(-1, pick).squeeze(-1)
            kl_coef = torch.where((kl_coef < 0) & valid & (lp_s > lp_t), torch.zeros_like(kl_coef), kl_coef)
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
        from unlearn_fast.ops.extension import C

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


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_reused_logit_buffers_change_nothing(backend, monkeypatch):
    """Calls inside reused_logit_buffers (one buffer, grown when a call needs more, stale values
    left in it) give bit-equal results to calls with fresh buffers, with and without a teacher."""
    from unlearn_fast.ops.loss_head import _reuse, reused_logit_buffers

    if backend == "cpp" and not _cpp_built():
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)

    def run(n, teacher=True, seed=0):
        hs, ht, w, targets, kl_coef, ce_coef = make(n, 16, 211, seed=seed)
        out = eul_loss_head(hs, ht if teacher else None, w, targets, kl_coef, ce_coef, chunk_rows=8)
        out.loss.backward()
        return out.loss.detach(), out.kl, out.ce, hs.grad

    calls = [(5, True, 0), (29, True, 1), (13, False, 2), (29, True, 3)]  # grows, shrinks, no teacher
    fresh = [run(*c) for c in calls]
    with reused_logit_buffers():
        with reused_logit_buffers():  # nested: the outer buffer
            reused = [run(*c) for c in calls]
            held = _reuse.buffer
            assert held.numel() == 2 * 8 * 211  # the largest call: 8-row chunks of student and teacher
        assert _reuse.buffer is held
    assert getattr(_reuse, "buffer", None) is None  # let go at the end
    for a, b in zip(fresh, reused):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_reused_logit_buffer_is_per_thread():
    import threading

    from unlearn_fast.ops.loss_head import _logit_buffer, reused_logit_buffers

    cpu = torch.device("cpu")
    with reused_logit_buffers():
        first = _logit_buffer(4, 10, cpu)
        assert _logit_buffer(3, 10, cpu).data_ptr() == first.data_ptr()  # the same memory
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_logit_buffer(4, 10, cpu).data_ptr()))
        worker.start()
        worker.join()
        assert seen and seen[0] != first.data_ptr()  # another thread: a buffer of its own


def _cpp_built():
    from unlearn_fast.ops.extension import C

    return C is not None


def test_shape_errors():
    hs, ht, w, targets, kl_coef, ce_coef = make(5, 4, 7)
    with pytest.raises(ValueError, match="head weight"):
        eul_loss_head(hs, ht, w[:, :3], targets, kl_coef, ce_coef)
    with pytest.raises(ValueError, match="targets"):
        eul_loss_head(hs, ht, w, targets[:3], kl_coef, ce_coef)


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 oracle, forward and backward, on odd shapes.
# Triton runs on the CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow).
# ---------------------------------------------------------------------------------------------
# TRITON_INTERPRET must be set before triton is imported (its standard library is decorated at import),
# and anything may import triton first in a full test run (torch.compile does). So the Triton cases run
# in this process only when the variable was set when the tests started; otherwise
# test_triton_cases_under_the_interpreter runs them in a fresh subprocess that sets it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def triton_interpreted():
    """The Triton kernels module, interpreted on the CPU."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not INTERPRETED:
        pytest.skip("Triton cases run in test_triton_cases_under_the_interpreter's subprocess")
    return importlib.import_module("unlearn_fast.kernels.loss_head")


def test_triton_cases_under_the_interpreter():
    """Run this file's Triton cases (``-k triton``) with TRITON_INTERPRET=1 set from the start."""
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the Triton cases run in this process")
    run_triton_cases_under_interpreter(__file__, "triton and not under_the_interpreter", timeout=900)


@pytest.fixture(params=["reference", "cpp", "triton"])
def backend(request, monkeypatch):
    """Force one backend (skipped where it cannot run here)."""
    name = request.param
    if name == "cpp":
        from unlearn_fast.ops.extension import C

        if C is None:
            pytest.skip("C++ extension not built")
    if name == "triton":
        request.getfixturevalue("triton_interpreted")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", name)
    return name


def _mid_bound(values: torch.Tensor) -> float:
    """A cap that splits ``values`` and sits in their widest gap near the median (fp32 and fp64 then
    agree on which rows are capped)."""
    v = torch.sort(values.double().unique()).values
    gaps = v[1:] - v[:-1]
    mid = v.numel() // 2
    lo, hi = max(0, mid - 4), min(gaps.numel(), mid + 4)
    i = lo + int(torch.argmax(gaps[lo:hi]))
    return float((v[i] + v[i + 1]) / 2)


def scenario(name):
    """(inputs, kwargs) of one named case; every case has N = 37, H = 72, V = 1031 unless it says."""
    n, h, v = 37, 72, 1031
    hs, ht, w, targets, kl_coef, ce_coef = make(n, h, v, seed=3)
    kwargs = dict(chunk_rows=16)
    if name == "odd":  # ignore_index rows, zero and mixed-sign coefficients, several chunks
        pass
    elif name == "bias_T2":
        kwargs.update(bias=torch.randn(v, generator=torch.Generator().manual_seed(9)), temperature=2.0,
                      chunk_rows=64)
    elif name == "T_half_softcap":
        kwargs.update(temperature=0.5, logit_scale=0.8, logit_softcap=5.0)
    elif name == "all_ignored":
        targets = torch.full_like(targets, IGNORE_INDEX)
    elif name == "retain_only":
        kl_coef, ce_coef = torch.full((n,), 0.8 / n), torch.full((n,), 1.0 / n)
    elif name == "forget_only":  # maximised terms, half of the rows past each cap
        kl_coef, ce_coef = torch.full((n,), -1.0 / n), torch.full((n,), -0.2 / n)
        _, kl, ce = oracle(hs.detach(), ht, w, targets, kl_coef, ce_coef)
        kwargs.update(kl_bound=_mid_bound(kl), ce_bound=_mid_bound(ce[targets != IGNORE_INDEX]))
    elif name == "no_teacher":
        ht = None
    elif name == "small_noise":  # EUL's start: student = teacher + 1e-3
        hs, ht, w, targets, kl_coef, ce_coef = make(n, h, v, seed=4, noise=1e-3)
    elif name == "guard":  # the sharpening guard drops the forget KL of some rows (checked in the test)
        kl_coef = torch.where(torch.arange(n) % 4 < 3, -1.0 / n, 0.8 / n)
        ce_coef = torch.where(kl_coef < 0, -0.2 / n, 1.0 / n)
        kwargs.update(sharpening_guard=True, temperature=1.5)
    else:
        raise KeyError(name)
    return (hs, ht, w, targets, kl_coef, ce_coef), kwargs


SCENARIOS = ["odd", "bias_T2", "T_half_softcap", "all_ignored", "retain_only", "forget_only", "no_teacher",
             "small_noise", "guard"]


def _check_against_oracle(args, kwargs, *, loss_tol=1e-5, grad_tol=1e-4):
    hs, ht, w, targets, kl_coef, ce_coef = args
    out = eul_loss_head(*args, **kwargs)
    out.loss.backward(torch.tensor(1.7))
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_rows"}
    hs64 = hs.detach().double().requires_grad_(True)
    ref, kl, ce = oracle(hs64, ht, w, targets, kl_coef, ce_coef, **ref_kwargs)
    (ref * 1.7).backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=loss_tol, atol=loss_tol)
    torch.testing.assert_close(out.kl.double(), kl.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), ce.detach(), rtol=1e-5, atol=1e-5)
    rel = ((hs.grad.double() - hs64.grad).norm() / hs64.grad.norm().clamp(min=1e-30)).item()
    assert rel < grad_tol, rel
    return out, hs64.grad


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_backend_matches_float64(backend, name):
    args, kwargs = scenario(name)
    out, grad_ref = _check_against_oracle(args, kwargs)
    if name == "all_ignored":
        assert torch.all(out.ce == 0)
    if name == "forget_only":  # some rows capped (no gradient), some not
        capped = out.kl.double() > kwargs["kl_bound"]
        assert capped.any() and (~capped).any()
    if name == "guard":  # the guard changed the loss: some forget rows dropped their KL, some kept it
        unguarded = eul_loss_head(*args, **{**kwargs, "sharpening_guard": False})
        no_forget_kl = eul_loss_head(*args[:4], torch.where(args[4] < 0, 0.0, args[4]), args[5], **kwargs)
        assert not torch.isclose(out.loss, unguarded.loss, rtol=1e-4)  # some forget rows dropped their KL
        assert not torch.isclose(out.loss, no_forget_kl.loss, rtol=1e-4)  # and some kept it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_backend_16bit(backend, dtype):
    """16-bit hidden states and head: fp32 logits, so the loss matches fp64 on the same 16-bit values;
    the gradient is as good as its 16-bit rounding."""
    hs, ht, w, targets, kl_coef, ce_coef = make(37, 72, 1031, dtype=dtype, noise=1e-2, seed=5)
    out = eul_loss_head(hs, ht, w, targets, kl_coef, ce_coef, chunk_rows=16)
    out.loss.backward()
    hs64 = hs.detach().double().requires_grad_(True)
    ref, _, _ = oracle(hs64, ht, w, targets, kl_coef, ce_coef)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    assert hs.grad.dtype == dtype
    rel = (hs.grad.double() - hs64.grad).norm() / hs64.grad.norm()
    floor = (hs64.grad.to(dtype).double() - hs64.grad).norm() / hs64.grad.norm()
    assert rel < 1.2 * floor, (rel, floor)  # as good as rounding the exact gradient to its dtype


def test_every_backend_student_equal_teacher_is_exact(backend):
    hs, ht, w, targets, _, _ = make(21, 40, 333, noise=0.0)
    n = hs.shape[0]
    for T in (1.0, 2.0):
        hs.grad = None
        out = eul_loss_head(hs, ht, w, torch.full((n,), IGNORE_INDEX), torch.ones(n), torch.zeros(n),
                            temperature=T, chunk_rows=8)
        out.loss.backward()
        assert out.kl.abs().max() < 1e-6
        assert hs.grad.abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# The Triton kernels one by one (interpreter).
# ---------------------------------------------------------------------------------------------
def test_triton_row_kernel_in_place_and_bad_target(triton_interpreted):
    from unlearn_fast.ops import loss_rows_reference

    g = torch.Generator().manual_seed(2)
    n, V = 9, 517
    s = torch.randn(n, V, generator=g) * 3
    t = s + torch.randn(n, V, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[::4] = IGNORE_INDEX
    kl_coef = torch.tensor([0.8, -1.0, 0.0, 0.3, -0.5, 1.0, -1.0, 0.2, 0.0])
    ce_coef = torch.tensor([1.0, -0.2, 0.0, 0.5, 1.0, -1.0, 0.3, 0.0, 1.0])
    for T in (1.0, 2.0):
        for guard in (False, True):
            ref = loss_rows_reference(s, t, targets, kl_coef, ce_coef, 0.5, 4.0, T, guard)
            s2 = s.clone()
            out = triton_interpreted.loss_rows(s2, t, targets, kl_coef, ce_coef, 0.5, 4.0, T,
                                               sharpening_guard=guard, grad=s2)
            assert out[2].data_ptr() == s2.data_ptr()
            for got, want in zip(out, ref):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    bad = targets.clone()
    bad[1] = V
    _, ce, _, _ = triton_interpreted.loss_rows(s, t, bad, kl_coef, ce_coef, 0.5, 4.0, 1.0)
    assert torch.isnan(ce[1]) and not torch.isnan(ce[2:]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gemm_kernels_16bit(triton_interpreted, dtype):
    """The logits pair reads one weight tile for both products; grad_hidden keeps ~16 bits of the
    logit gradient with a 16-bit head (hi/lo bf16 split of G, and of W for fp16), where rounding G to
    bf16 would lose ~1e-3."""
    g = torch.Generator().manual_seed(0)
    M, H, V = 19, 40, 77
    xs, xt = (torch.randn(M, H, generator=g).to(dtype) for _ in range(2))
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g)
    out_s, out_t = torch.empty(M, V), torch.empty(M, V)
    triton_interpreted.logits_pair(xs, xt, w, b, 0.7, out_s, out_t)
    for x, out in ((xs, out_s), (xt, out_t)):
        want = 0.7 * (x.double() @ w.double().t() + b.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    grad = torch.randn(M, V, generator=g) * 1e-3
    want = 1.3 * grad.double() @ w.double()
    bf16_rounded = 1.3 * grad.bfloat16().double() @ w.double()
    out = torch.empty(M, H)
    triton_interpreted.grad_hidden(grad, w, 1.3, out)
    rel = (out.double() - want).norm() / want.norm()
    assert rel < 1e-4 and rel < 0.05 * (bf16_rounded - want).norm() / want.norm(), rel


# ---------------------------------------------------------------------------------------------
# torch.compile, opcheck and backend choice
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_on_cpu():
    """The forward is one custom op with a fake implementation: no graph break, same numbers."""
    hs, ht, w, targets, kl_coef, ce_coef = make(13, 8, 37)

    def step(h, t):
        out = eul_loss_head(h, t, w, targets, kl_coef, ce_coef, temperature=2.0, chunk_rows=5)
        return out.loss * 2 + out.kl.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(hs, ht)
    loss.backward()
    grad = hs.grad.clone()
    hs.grad = None
    eager = step(hs, ht)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, hs.grad)


def test_custom_op_passes_opcheck():
    from unlearn_fast.ops.loss_head import _loss_head_fwd

    hs, ht, w, targets, kl_coef, ce_coef = make(11, 8, 29)
    for teacher in (ht, None):
        for guard in (False, True):
            args = (hs, teacher, w, None, targets, kl_coef, ce_coef, float("inf"), float("inf"), 1.5, 1.0, None, 4,
                    "reference", False, guard)
            torch.library.opcheck(_loss_head_fwd, args)


def test_backend_choice(monkeypatch):
    from unlearn_fast.errors import UnlearnFastError
    from unlearn_fast.ops.backend import pick_backend

    available = ("cpp", "cuda", "triton")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cuda")
    with pytest.raises(UnlearnFastError):
        pick_backend(torch.device("cpu"), available)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(UnlearnFastError, match="Triton"):
            pick_backend(torch.device("cpu"), available)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "auto")
    from unlearn_fast.ops.extension import C

    assert pick_backend(torch.device("cpu"), available) == ("cpp" if C is not None else "reference")

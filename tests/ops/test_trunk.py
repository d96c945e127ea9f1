"""The trunk ops (RMSNorm, SwiGLU product): the references against transformers' modules; the C++
and Triton backends against float64, forward and backward, on odd shapes (Triton also in fp16/bf16,
its chunked path for wide rows, and RMSNorm bit-exact to the transformers formula in 16 bits);
backend dispatch, the registered ops (opcheck) and torch.compile.

The Triton tests run directly on a GPU or when TRITON_INTERPRET=1 is set; otherwise
test_triton_under_interpreter reruns them on the CPU in a subprocess with TRITON_INTERPRET=1.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import run_triton_cases_under_interpreter, triton_can_run
from unlearn_fast.ops.extension import C
from unlearn_fast.ops import rms_norm, rms_norm_reference, swiglu, swiglu_reference

needs_cpp = pytest.mark.skipif(C is None, reason="the C++ extension is not built")

SHAPES = [(37, 72), (2, 19, 72), (5, 1031), (1, 1)]


def rms64(x, w, eps):
    x = x.double()
    return w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu64(g, u):
    g = g.double()
    return g * torch.sigmoid(g) * u.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_transformers_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(72, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(72))
    x = torch.randn(3, 11, 72).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, module.weight, 1e-5), module(x))


def test_swiglu_reference_is_silu_times_up():
    g, u = torch.randn(9, 13), torch.randn(9, 13)
    assert torch.equal(swiglu_reference(g, u), F.silu(g) * u)


def _rms_case(shape, seed=0, weight_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_(True)
    w = torch.randn(shape[-1], generator=gen).requires_grad_(weight_grad)
    return x, w, torch.randn(shape, generator=gen)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "weight-grad"])
def test_cpp_rms_norm_matches_float64(shape, weight_grad, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    x, w, dy = _rms_case(shape, weight_grad=weight_grad)
    y = rms_norm(x, w, 1e-5)
    assert type(y.grad_fn).__name__.startswith("_RMSNormFunction")
    assert y.shape == x.shape and y.dtype == x.dtype
    inputs = (x, w) if weight_grad else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(weight_grad)
    y64 = rms64(x64, w64, 1e-5)
    grads64 = torch.autograd.grad(y64, (x64, w64) if weight_grad else (x64,), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_swiglu_matches_float64(shape, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    gen = torch.Generator().manual_seed(1)
    # gate spans both tails of the sigmoid (the vectorised exp must not overflow or lose them)
    g = (torch.randn(shape, generator=gen) * 8).requires_grad_(True)
    u = torch.randn(shape, generator=gen).requires_grad_(True)
    dh = torch.randn(shape, generator=gen)
    h = swiglu(g, u)
    assert type(h.grad_fn).__name__.startswith("_SwiGLUFunction")
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    h64 = swiglu64(g64, u64)
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    torch.testing.assert_close(h.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg.double(), dg64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du.double(), du64, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpp_swiglu_gradient_of_one_input_only(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    g = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(4, 6)
    swiglu(g, u).sum().backward()
    g64 = g.detach().double()
    s = torch.sigmoid(g64)
    torch.testing.assert_close(g.grad.double(), u.double() * s * (1 + g64 * (1 - s)), rtol=1e-5, atol=1e-6)


@needs_cpp
def test_auto_picks_cpp_for_float32_and_the_reference_otherwise(monkeypatch):
    monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(8)
    assert type(rms_norm(x, w).grad_fn).__name__.startswith("_RMSNormFunction")
    assert type(swiglu(x, x * 2).grad_fn).__name__.startswith("_SwiGLUFunction")
    # bf16 on the CPU, a weight of another dtype, or a forced reference: the transformers formula
    xb = x.detach().bfloat16().requires_grad_(True)
    assert torch.equal(rms_norm(xb, w.bfloat16()), rms_norm_reference(xb, w.bfloat16(), 1e-6))
    assert not type(rms_norm(x, w.double()).grad_fn).__name__.startswith("_RMSNormFunction")
    assert not type(swiglu(xb, xb).grad_fn).__name__.startswith("_SwiGLUFunction")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "reference")
    assert not type(rms_norm(x, w).grad_fn).__name__.startswith("_RMSNormFunction")


def test_empty_inputs():
    x = torch.zeros(0, 8)
    assert rms_norm(x, torch.ones(8)).shape == (0, 8)
    assert swiglu(x, x).shape == (0, 8)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(3, 8), torch.randn(7))
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))


@needs_cpp
def test_cpp_kernels_refuse_bad_tensors():
    ops = torch.ops.unlearn_fast
    with pytest.raises(TypeError, match="float32"):
        ops.rms_norm_forward(torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm_forward(torch.randn(3, 8), torch.randn(5), 1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        ops.swiglu_forward(torch.randn(3, 8), torch.randn(3, 7))


@needs_cpp
def test_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    ops = torch.ops.unlearn_fast
    x, w, g, u = torch.randn(7, 24), torch.randn(24), torch.randn(5, 33), torch.randn(5, 33)
    y, rstd = ops.rms_norm_forward(x, w, 1e-6)
    opcheck(ops.rms_norm_forward.default, (x, w, 1e-6))
    opcheck(ops.rms_norm_backward.default, (torch.randn(7, 24), x, w, rstd))
    opcheck(ops.swiglu_forward.default, (g, u))
    opcheck(ops.swiglu_backward.default, (torch.randn(5, 33), g, u))


@needs_cpp
def test_torch_compile_through_the_ops(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    w = torch.randn(16)

    def block(x, gate, up):
        return rms_norm(x, w, 1e-5).sum() + swiglu(gate, up).sum()

    x, gate, up = (torch.randn(6, 16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, gate, up)
    grads = torch.autograd.grad(out, (x, gate, up))
    out_eager = block(x, gate, up)
    grads_eager = torch.autograd.grad(out_eager, (x, gate, up))
    torch.testing.assert_close(out, out_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Triton backend (unlearn_fast.kernels.trunk), through the public ops with UNLEARN_FAST_BACKEND=triton
# --------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not triton_can_run(), reason="no GPU and no TRITON_INTERPRET=1: runs in "
                                  "test_triton_under_interpreter's subprocess (if triton is installed)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# [37, 72]: rows narrower than the block (masked); [2, 19, 72]: 3-D input; [5, 1031]: odd wide rows
# and, for SwiGLU, several programs with a masked tail.
TRITON_SHAPES = [(37, 72), (2, 19, 72), (5, 1031)]
SHAPE_IDS = ["x".join(map(str, s)) for s in TRITON_SHAPES]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}



def assert_matches(got, want64, eager, what):
    """got (Triton) against the float64 oracle. fp32: rel. 1e-5. 16-bit (the flash-attention rule):
    max error at most twice that of the same formula run eagerly in that dtype (``eager``), plus a
    little slack for where eager happens to be exact."""
    assert got.dtype == eager.dtype and got.shape == want64.shape, what
    scale = want64.abs().max().item()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
    else:
        err = (got.double() - want64).abs().max().item()
        eager_err = (eager.double() - want64).abs().max().item()
        assert err <= 2 * eager_err + 1e-4 * scale, f"{what}: max error {err:.3g}, eager {eager_err:.3g}"


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
def rms_case(shape, dtype, weight_grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return x.requires_grad_(True), w.requires_grad_(weight_grad), dy


def check_rms_norm(shape, dtype, weight_grad, monkeypatch):
    x, w, dy = rms_case(shape, dtype, weight_grad)
    inputs = (x, w) if weight_grad else (x,)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    y = rms_norm(x, w, EPS)
    assert type(y.grad_fn).__name__.startswith("_RMSNormFunction")
    grads = torch.autograd.grad(y, inputs, dy)

    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(weight_grad)
    y64 = rms64(x64, w64, EPS)
    grads64 = torch.autograd.grad(y64, (x64, w64) if weight_grad else (x64,), dy.double())
    y_eager = rms_norm_reference(x, w, EPS)  # plain autograd in x's dtype: the 16-bit error budget
    grads_eager = torch.autograd.grad(y_eager, inputs, dy)

    assert_matches(y.detach(), y64.detach(), y_eager.detach(), "y")
    for name, got, want, eager in zip(("dx", "dw"), grads, grads64, grads_eager):
        assert_matches(got, want, eager, name)


@needs_triton
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "weight-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=SHAPE_IDS)
def test_triton_rms_norm_matches_float64(shape, dtype, weight_grad, monkeypatch):
    check_rms_norm(shape, dtype, weight_grad, monkeypatch)


@needs_triton
def test_triton_rms_norm_fp16(monkeypatch):
    check_rms_norm((37, 72), torch.float16, True, monkeypatch)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_triton_rms_norm_chunked_rows(dtype, monkeypatch):
    """Rows wider than MAX_BLOCK_D take the two-pass chunked loop (forced here with a small block:
    d = 1031 is four full chunks and a 7-wide masked one)."""
    from unlearn_fast.kernels import trunk as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_D", 256)
    assert not kernels._row_blocks(1031)["ONE_BLOCK"]
    check_rms_norm((5, 1031), dtype, False, monkeypatch)


@needs_triton
@pytest.mark.parametrize("max_block", [8192, 256], ids=["one-block", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_triton_rms_norm_is_transformers_formula(dtype, max_block, monkeypatch):
    """16-bit y is LlamaRMSNorm's: normalise in fp32, round, × w rounded. Equal to the reference
    but for an ulp where rstd's last bit (its summation order) tips a rounding."""
    from unlearn_fast.kernels import trunk as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_D", max_block)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    for shape in [(37, 72), (5, 1031)]:
        x, w, _ = rms_case(shape, dtype, False, seed=3)
        with torch.no_grad():
            y = rms_norm(x, w, EPS)
            ref = rms_norm_reference(x, w, EPS)
        assert y.dtype == dtype
        ulps = (y.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert ulps.max().item() <= 1, f"{shape}: {ulps.max().item()} ulps apart"
        assert (ulps == 0).double().mean().item() >= 0.99, f"{shape}: {(ulps != 0).sum().item()} differ"


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------
def check_swiglu(shape, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    # the gate spans both tails of the sigmoid
    g = (torch.randn(shape, generator=gen) * 6).to(DEVICE, dtype).requires_grad_(True)
    u = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    dh = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    h = swiglu(g, u)
    assert type(h.grad_fn).__name__.startswith("_SwiGLUFunction")
    grads = torch.autograd.grad(h, (g, u), dh)

    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    h64 = swiglu64(g64, u64)
    grads64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    h_eager = swiglu_reference(g, u)
    grads_eager = torch.autograd.grad(h_eager, (g, u), dh)

    assert_matches(h.detach(), h64.detach(), h_eager.detach(), "h")
    for name, got, want, eager in zip(("dgate", "dup"), grads, grads64, grads_eager):
        assert_matches(got, want, eager, name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=SHAPE_IDS)
def test_triton_swiglu_matches_float64(shape, dtype, monkeypatch):
    check_swiglu(shape, dtype, monkeypatch)


@needs_triton
def test_triton_swiglu_fp16(monkeypatch):
    check_swiglu((2, 19, 72), torch.float16, monkeypatch)


# --------------------------------------------------------------------------------------------
# Launchers on empty inputs (the ops send those to the reference; the launchers still cope)
# --------------------------------------------------------------------------------------------
@needs_triton
def test_triton_launchers_empty_inputs():
    from unlearn_fast.kernels import trunk as kernels

    x, w = torch.empty(0, 72, device=DEVICE), torch.ones(72, device=DEVICE)
    y, rstd = kernels.rms_norm_forward(x, w, EPS)
    assert y.shape == (0, 72) and rstd.shape == (0,) and rstd.dtype == torch.float32
    assert kernels.rms_norm_backward(x, x, w, rstd).shape == (0, 72)
    g = torch.empty(3, 0, dtype=torch.bfloat16, device=DEVICE)
    assert kernels.swiglu_forward(g, g).shape == (3, 0)
    dg, du = kernels.swiglu_backward(g, g, g)
    assert dg.shape == du.shape == (3, 0) and dg.dtype == torch.bfloat16


def test_triton_under_interpreter():
    """Runs the Triton tests above on the CPU (TRITON_INTERPRET=1, in a fresh process)."""
    run_triton_cases_under_interpreter(__file__, "triton and not under_interpreter")

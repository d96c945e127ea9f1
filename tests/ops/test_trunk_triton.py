"""The Triton backend of the trunk ops (unlearn_fast.kernels.trunk), through the public ops
``rms_norm`` / ``swiglu`` with UNLEARN_FAST_BACKEND=triton: forward and every gradient against a
float64 oracle on odd shapes (masked tails, several programs, the chunked path of wide rows), fp32,
bf16 and fp16; RMSNorm in 16 bits against the transformers formula (bit-exact up to 1 ulp); empty
inputs at the launchers.

The tests run directly on a GPU or when TRITON_INTERPRET=1 is set; otherwise
test_triton_under_interpreter reruns them on the CPU in a subprocess with TRITON_INTERPRET=1 (it has
to be set before triton is imported).
"""

import os
import subprocess
import sys

import pytest
import torch

from unlearn_fast.ops.trunk import rms_norm, rms_norm_reference, swiglu, swiglu_reference


def _triton_can_run() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not _triton_can_run(), reason="no GPU and no TRITON_INTERPRET=1: runs in "
                                  "test_triton_under_interpreter's subprocess (if triton is installed)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# [37, 72]: rows narrower than the block (masked); [2, 19, 72]: 3-D input; [5, 1031]: odd wide rows
# and, for SwiGLU, several programs with a masked tail.
SHAPES = [(37, 72), (2, 19, 72), (5, 1031)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rms64(x, w, eps):
    x = x.double()
    return w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu64(g, u):
    g = g.double()
    return g * torch.sigmoid(g) * u.double()


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
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
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
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
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
    if _triton_can_run():
        pytest.skip("the Triton tests run directly in this process")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("UNLEARN_FAST_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:benchmark",
           __file__, "-k", "triton and not under_interpreter"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]

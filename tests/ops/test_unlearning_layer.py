"""The unlearning-layer op: float64 gradcheck of the reference and an independent oracle; every
backend (reference, C++, Triton) against float64, forward and all gradients, on odd shapes; the
registered C++ ops (opcheck); a tiny Llama with two layers per block, fused vs reference.

The Triton tests run directly on a GPU or when TRITON_INTERPRET=1 is set; otherwise
test_triton_under_interpreter reruns them on the CPU in a subprocess with TRITON_INTERPRET=1 (it has
to be set before triton is imported).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import run_triton_cases_under_interpreter, triton_can_run
from unlearn_fast.ops.extension import C
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


# --------------------------------------------------------------------------------------------
# Every backend against a float64 oracle, forward and every gradient
# --------------------------------------------------------------------------------------------
HAS_CPP = C is not None and hasattr(C, "unlearning_layer_forward")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="unlearn_fast._C (with unlearning_layer) is not built")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ODD = dict(lead=(37,), d=72, ranks=(5, 8, 3))


def make_case(lead, d, ranks, x_dtype, seed=0):
    """x [*lead, d] in x_dtype, fp32 weights of trained-looking scale, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g).to(x_dtype)
    D = [torch.randn(r, d, generator=g) / d ** 0.5 for r in ranks]
    b = [0.5 * torch.randn(r, generator=g) for r in ranks]
    U = [torch.randn(d, r, generator=g) / r ** 0.5 for r in ranks]
    c = [0.1 * torch.randn(d, generator=g) for _ in ranks]
    grad_y = torch.randn(*lead, d, generator=g).to(x_dtype)
    return x, D, b, U, c, grad_y


def forward_backward(fn, x, D, b, U, c, grad_y, activation, device="cpu", dtype=None):
    """y and the gradients of (x, every D, b, U, c) through ``fn``; tensors copied to device/dtype."""
    x = x.to(device, dtype or x.dtype).requires_grad_(True)
    params = [t.to(device, dtype or t.dtype).requires_grad_(True) for t in (*D, *b, *U, *c)]
    k = len(D)
    y = fn(x, params[:k], params[k:2 * k], params[2 * k:3 * k], params[3 * k:], activation)
    grads = torch.autograd.grad(y, [x, *params], grad_y.to(device, dtype or grad_y.dtype))
    return y, grads


def rel_err(got, want):
    return ((got.detach().cpu().double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_against_float64(activation, x_dtype, lead, d, ranks, device="cpu"):
    case = make_case(lead, d, ranks, x_dtype)
    y, grads = forward_backward(unlearning_layer, *case, activation, device=device)
    y64, grads64 = forward_backward(unlearning_layer_reference, *case, activation, dtype=torch.float64)
    assert y.dtype == x_dtype and y.shape == case[0].shape and y.device.type == device
    assert grads[0].dtype == x_dtype and all(g.dtype == torch.float32 for g in grads[1:])
    names = ["y", "x"] + [f"{p}{i}" for p in "DbUc" for i in range(len(ranks))]
    errors = {n: rel_err(t, ref) for n, t, ref in zip(names, [y, *grads], [y64, *grads64])}
    bad = {n: e for n, e in errors.items() if not e <= TOL[x_dtype]}
    assert not bad, f"relative errors above {TOL[x_dtype]}: {bad}"
    return y


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_backend_matches_float64(backend, activation, x_dtype, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    y = check_against_float64(activation, x_dtype, **ODD)
    fused = type(y.grad_fn).__name__.startswith("_UnlearningLayerFunction")
    assert fused == (backend != "reference")


@pytest.mark.parametrize("shape", [dict(lead=(37,), d=72, ranks=(7,)), dict(lead=(2, 19), d=72, ranks=(5, 8, 3)),
                                   dict(lead=(1,), d=17, ranks=(1, 2))], ids=["K1", "3d", "tiny"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_backend_shapes(backend, shape, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    check_against_float64("gelu", torch.float32, **shape)


@needs_cpp
def test_cpp_half_input(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    check_against_float64("silu", torch.float16, **ODD)


# The C++ op works on blocks of rows (a multiple of 12 near 32768 / d rows: 48 at d = 576, 324 at
# d = 100), runs of blocks ("chunks") spread over threads, and a register-tiled block GEMM, AVX-512 or
# AVX2 by what the CPU has (UNLEARN_FAST_CPU_GEMM=avx512|avx2|aten picks one; aten is ATen's BLAS on
# the blocks). These shapes cover a short last block, N below one block and below one kernel tile,
# N = 1, column counts the kernels must mask (R = 5, 13, 16, 33; d = 100, 72), wide panels (R = 128,
# d = 576) and outputs of >= 2 MiB, which are written with non-temporal stores ("blocks").
CPP_BLOCK_SHAPES = {
    "blocks": dict(lead=(1000,), d=576, ranks=(32,)),  # 20 blocks of 48 rows + 40
    "K4": dict(lead=(2, 101), d=576, ranks=(32, 32, 32, 32)),
    "odd": dict(lead=(613,), d=100, ranks=(5, 8, 3)),  # 324 + 289 rows
    "short": dict(lead=(11,), d=576, ranks=(13, 20)),
    "one-row": dict(lead=(1,), d=64, ranks=(7,)),
    "tails": dict(lead=(50,), d=90, ranks=(12, 11)),  # two-vector masked tails in both kernels
    "wide": dict(lead=(130,), d=576, ranks=(128,)),
}


def use_cpu_gemm(kernel, monkeypatch):
    """Ask the C++ op for one block GEMM kernel; skip where this CPU does not have it."""
    from unlearn_fast.ops.extension import C

    monkeypatch.setenv("UNLEARN_FAST_CPU_GEMM", kernel)
    if C.cpu_gemm_kernel() != kernel:
        pytest.skip(f"this CPU has no {kernel} kernel (the op uses {C.cpu_gemm_kernel()})")


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("gemm", ["avx512", "avx2", "aten"])
@pytest.mark.parametrize("shape", CPP_BLOCK_SHAPES.values(), ids=CPP_BLOCK_SHAPES.keys())
def test_cpp_blocks(shape, gemm, threads, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    use_cpu_gemm(gemm, monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for activation in ("relu", "silu"):
            check_against_float64(activation, torch.float32, **shape)
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_cpp_repeatable(monkeypatch):
    """Threads take chunks of blocks in whatever order they get to them; results do not change."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cpp")
    case = make_case((1000,), 576, (32, 16), torch.float32)
    first = forward_backward(unlearning_layer, *case, "gelu")
    for _ in range(3):
        again = forward_backward(unlearning_layer, *case, "gelu")
        for a, b in zip([first[0], *first[1]], [again[0], *again[1]]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_weights_only_gradients(backend, monkeypatch):
    """A frozen input (the lowest site of a frozen base) skips the grad-x GEMM; weights still train."""
    if backend == "triton" and not triton_can_run():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    lead = (37,) if backend == "triton" else (1000,)  # several blocks of rows in C++
    x, D, b, U, c, grad_y = make_case(lead, 72, (5, 8, 3), torch.float32)
    params = [t.to(device).requires_grad_(True) for t in (*D, *b, *U, *c)]
    y = unlearning_layer(x.to(device), params[:3], params[3:6], params[6:9], params[9:], "relu")
    grads = torch.autograd.grad(y, params, grad_y.to(device))
    _, grads64 = forward_backward(unlearning_layer_reference, x, D, b, U, c, grad_y, "relu", dtype=torch.float64)
    for got, want in zip(grads, grads64[1:]):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bad_layer_shapes(backend, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    x, D, b, U, c, _ = make_case((5,), 8, (2, 3), torch.float32)
    with pytest.raises(ValueError, match="layer 1"):
        unlearning_layer(x, D, b, [U[0], U[0]], c)
    with pytest.raises(ValueError, match="as many"):
        unlearning_layer(x, D, b[:1], U, c)


# --------------------------------------------------------------------------------------------
# The registered C++ ops
# --------------------------------------------------------------------------------------------
@needs_cpp
def test_opcheck():
    """Schema, fake (Meta) kernels and dispatch of torch.ops.unlearn_fast.unlearning_layer_*."""
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    x, D, b, U, c, g = make_case((9,), 12, (3, 2), torch.float32)
    D, b, U, c = torch.cat(D), torch.cat(b), torch.cat(U, 1), sum(c)
    fwd = torch.ops.unlearn_fast.unlearning_layer_forward
    bwd = torch.ops.unlearn_fast.unlearning_layer_backward
    opcheck(fwd.default, (x, D, b, U, c, "gelu"))
    opcheck(fwd.default, (x.bfloat16(), D, b, U, c, "relu"))
    _, pre = fwd(x, D, b, U, c, "gelu")
    opcheck(bwd.default, (g, x, pre, D, U, "gelu", True))
    opcheck(bwd.default, (g, x, pre, D, U, "gelu", False))


@needs_cpp
def test_cpp_bad_inputs():
    x, D, b, U, c, g = make_case((4,), 6, (3,), torch.float32)
    D, b, U, c = D[0], b[0], U[0], c[0]
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        C.unlearning_layer_forward(x, D, b, U, c, "tanh")
    with pytest.raises(RuntimeError, match=r"up_weight must have shape \[6, 3\]"):
        C.unlearning_layer_forward(x, D, b, U.t().contiguous(), c, "relu")
    with pytest.raises(RuntimeError, match="down_weight must be float32"):
        C.unlearning_layer_forward(x, D.double(), b, U, c, "relu")
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        C.unlearning_layer_forward(x.double(), D, b, U, c, "relu")
    _, pre = C.unlearning_layer_forward(x, D, b, U, c, "relu")
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[4, 6\]"):
        C.unlearning_layer_backward(g[:3], x, pre, D, U, "relu", True)


# --------------------------------------------------------------------------------------------
# Triton: on a GPU directly; on the CPU under TRITON_INTERPRET=1, which must be set before triton is
# imported, so the outer test reruns this file's Triton tests in a subprocess with it set.
# --------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not triton_can_run(), reason="no GPU and no TRITON_INTERPRET=1: runs in "
                                  "test_triton_under_interpreter's subprocess (if triton is installed)")


@needs_triton
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_triton_backend_matches_float64(activation, x_dtype, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    y = check_against_float64(activation, x_dtype, **ODD, device=device)
    assert type(y.grad_fn).__name__.startswith("_UnlearningLayerFunction")


@needs_triton
@pytest.mark.parametrize("case", [(dict(lead=(37,), d=72, ranks=(7,)), torch.float32),
                                  (dict(lead=(2, 19), d=72, ranks=(5, 8, 3)), torch.float32),
                                  (dict(lead=(3,), d=40, ranks=(20,)), torch.float16)], ids=["K1", "3d", "fp16"])
def test_triton_backend_shapes(case, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    shape, x_dtype = case
    check_against_float64("silu", x_dtype, **shape, device="cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
@pytest.mark.parametrize("activation, x_dtype", [("relu", torch.bfloat16), ("gelu", torch.float32),
                                                 ("silu", torch.bfloat16)], ids=["relu-bf16", "gelu-fp32", "silu-bf16"])
def test_triton_backend_wide_path(activation, x_dtype, monkeypatch):
    """The tiled-GEMM path that wide bottlenecks (many layers) take, forced on the odd shape."""
    from unlearn_fast.kernels import unlearning_layer as kernels

    monkeypatch.setattr(kernels, "NARROW_MAX_RP", 0)
    assert kernels.default_blocks(16)["path"] == "wide"
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    check_against_float64(activation, x_dtype, **ODD, device="cuda" if torch.cuda.is_available() else "cpu")


SMALL_BLOCKS = {
    "narrow": dict(path="narrow", BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, W_BLOCK_M=32, W_BLOCK_N=32, num_warps=4),
    "wide": dict(path="wide", BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4),
}


@needs_triton
@pytest.mark.parametrize("path", ["narrow", "wide"])
def test_triton_backend_many_tiles(path, monkeypatch):
    """Small blocks, so every grid dimension has several programs (rank tiles in the wide path), and
    the weight gradients are summed over several row splits as on a GPU."""
    from unlearn_fast.kernels import unlearning_layer as kernels

    monkeypatch.setattr(kernels, "default_blocks", lambda R, dtype=None: SMALL_BLOCKS[path])
    monkeypatch.setattr(kernels, "_row_splits", lambda device, n, programs, step: (-(-n // step), step))
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    check_against_float64("gelu", torch.bfloat16, lead=(70,), d=40, ranks=(25, 15),
                          device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("programs", [1, 16, 32, 64, 131, 132, 200])
def test_row_splits_fill_one_wave(programs, monkeypatch):
    """On a 132-SM GPU the row splits of a weight-gradient reduction never make more programs than SMs
    (one wave; a kernel of one program per SM would need two for 133), and they cover every row."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from unlearn_fast.kernels import unlearning_layer as kernels

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    for n in (8192, 1000, 64):
        splits, rows = kernels._row_splits(torch.device("cuda"), n, programs, 64)
        assert splits >= 1 and rows % 64 == 0 and splits * rows >= n > (splits - 1) * rows
        assert splits * programs <= max(132, programs)
        if n == 8192 and 16 <= programs <= 66:  # enough rows and room for splits: most SMs busy
            assert splits * programs > 132 - programs


def test_triton_under_interpreter():
    """Runs the Triton tests above on the CPU (TRITON_INTERPRET=1, in a fresh process)."""
    run_triton_cases_under_interpreter(__file__, "triton_backend or (weights_only and triton)")


# --------------------------------------------------------------------------------------------
# Model level: a tiny Llama with K = 2 layers per block, fused C++ vs reference
# --------------------------------------------------------------------------------------------
@needs_cpp
def test_llama_with_two_layers_per_block(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from unlearn_fast.model.layers import LayerConfig, attach, sites, unlearning_parameters

    ops_module = importlib.import_module("unlearn_fast.ops.unlearning_layer")  # the module, not the function

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    attach(model, LayerConfig(rank=4, activation="gelu"))
    attach(model, LayerConfig(rank=3, activation="gelu"))
    assert all(len(s.layers) == 2 for s in sites(model)) and len(sites(model)) == 2
    params = unlearning_parameters(model)
    with torch.no_grad():  # trained layers: non-zero up-projections
        for layer in (layer for s in sites(model) for layer in s.layers):
            layer.up.weight.normal_(std=0.3)
            layer.up.bias.normal_(std=0.1)
    for p in params:  # attach() freezes what was there before; train both requests' layers here
        p.requires_grad_(True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))

    def run(backend):
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
        logits = model(input_ids=ids).logits
        return logits.detach(), torch.autograd.grad((logits * weights).sum(), params)

    ref_logits, ref_grads = run("reference")
    fused_calls = []
    forward, backward = ops_module._FUSED["cpp"]
    monkeypatch.setitem(ops_module._FUSED, "cpp", (lambda *a: fused_calls.append(a) or forward(*a), backward))
    logits, grads = run("cpp")
    assert len(fused_calls) == 2 and all(call[1].shape[0] == 7 for call in fused_calls)  # 2 sites, Σr = 4 + 3
    assert rel_err(logits, ref_logits.double()) <= 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want.double()) <= 1e-5

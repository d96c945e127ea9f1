"""Small @triton.jit helpers shared by the kernels: a rounding cast and a dot that also runs under the
interpreter."""

import triton
import triton.language as tl


@triton.jit
def cast_rounded(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """v.to(dtype), rounded to nearest even. The interpreter truncates fp32 -> bf16 (the GPU rounds),
    so there the rounding is done on the bits first."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def dot_acc(a, b, acc, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b, fp32 accumulation, b cast to a's dtype. Under the interpreter 16-bit operands go in
    as fp32 (its bf16 dot multiplies the raw bits; 16-bit products are exact in fp32 anyway)."""
    b = cast_rounded(b, a.dtype, INTERPRET)
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)

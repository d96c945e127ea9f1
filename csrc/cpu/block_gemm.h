// Small fp32 GEMMs on blocks of rows, for the CPU kernels (csrc/cpu/unlearning_layer.cpp).
//
//   C [m, n] = init + bias + A B
//
// B [k, n], C and init (optional, may be C itself) row-major; bias (optional) [n] added to every row;
// A [m, k] strided, A(i, p) = A[i * rs + p * cs], so a row-major A (cs = 1) and a transposed one
// (rs = 1) are one case. Serial: called inside the caller's parallel region, on blocks of ~50 rows
// and skinny shapes (one dimension R = 32..128), where a BLAS call pays for packing and dispatch on
// every block. Three kernels:
//
//   avx512  register-tiled, operands read in place (block_gemm_avx512.cpp, compiled with -mavx512f)
//   avx2    the same tiling in 256-bit registers with FMA (block_gemm_avx2.cpp, -mavx2 -mfma)
//   aten    at::addmm_out on views of the blocks (any CPU)
//
// The fastest one the CPU has is used; UNLEARN_FAST_CPU_GEMM=avx512|avx2|aten asks for one (tests use
// it to cover each path; a kernel the CPU lacks falls back to the next one down).
#pragma once

#include <cstdint>

namespace unlearn_fast {
namespace cpu {

struct StridedA {
  const float* p;
  int64_t rs, cs;
};
struct RowMajor {
  const float* p = nullptr;
  int64_t ld = 0;
};

enum class GemmKernel { kAten, kAvx2, kAvx512 };

// The kernel to use for this op call (reads UNLEARN_FAST_CPU_GEMM; cheap, call once per op call).
GemmKernel pick_gemm_kernel();
const char* gemm_kernel_name(GemmKernel kernel);

// stream: write C with non-temporal stores where C's alignment and ldc allow (the register-tiled
// kernels only); for outputs that go to memory anyway. Issues the store fence itself.
void block_gemm(GemmKernel kernel, int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc,
                RowMajor init = {}, const float* bias = nullptr, bool stream = false);

// The instruction-set kernels (x86-64 builds only; block_gemm dispatches to them).
void block_gemm_avx512(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                       const float* bias, bool stream);
void block_gemm_avx2(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                     const float* bias, bool stream);

}  // namespace cpu
}  // namespace unlearn_fast

// Kernel choice and the ATen fallback of the block GEMM (block_gemm.h).
#include "block_gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <string>

namespace unlearn_fast {
namespace cpu {

namespace {

bool cpu_has(GemmKernel kernel) {
#ifdef UNLEARN_FAST_X86_KERNELS
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (kernel == GemmKernel::kAvx512) return avx512;
  if (kernel == GemmKernel::kAvx2) return avx2;
#endif
  return kernel == GemmKernel::kAten;
}

// Elsewhere: the BLAS torch uses, through at::addmm_out on views of the blocks.
void block_gemm_aten(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                     const float* bias) {
  auto view = [](const float* p, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
    return at::from_blob(const_cast<float*>(p), {rows, cols}, {rs, cs}, at::kFloat);
  };
  at::Tensor c = view(C, m, n, ldc, 1);
  if (init.p && init.p != C) c.copy_(view(init.p, m, n, init.ld, 1));
  if (bias) init.p ? c.add_(view(bias, 1, n, n, 1)) : c.copy_(view(bias, 1, n, n, 1).expand({m, n}));
  at::addmm_out(c, c, view(A.p, m, k, A.rs, A.cs), view(B.p, k, n, B.ld, 1), init.p || bias ? 1.f : 0.f, 1.f);
}

}  // namespace

GemmKernel pick_gemm_kernel() {
  const char* env = std::getenv("UNLEARN_FAST_CPU_GEMM");
  const std::string asked = env ? env : "";
  GemmKernel kernel = asked == "aten" ? GemmKernel::kAten : asked == "avx2" ? GemmKernel::kAvx2 : GemmKernel::kAvx512;
  while (!cpu_has(kernel)) kernel = static_cast<GemmKernel>(static_cast<int>(kernel) - 1);  // kAten always is
  return kernel;
}

const char* gemm_kernel_name(GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::kAvx512: return "avx512";
    case GemmKernel::kAvx2: return "avx2";
    default: return "aten";
  }
}

void block_gemm(GemmKernel kernel, int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc,
                RowMajor init, const float* bias, bool stream) {
#ifdef UNLEARN_FAST_X86_KERNELS
  if (kernel == GemmKernel::kAvx512) return block_gemm_avx512(m, n, k, A, B, C, ldc, init, bias, stream);
  if (kernel == GemmKernel::kAvx2) return block_gemm_avx2(m, n, k, A, B, C, ldc, init, bias, stream);
#endif
  block_gemm_aten(m, n, k, A, B, C, ldc, init, bias);
}

}  // namespace cpu
}  // namespace unlearn_fast

// The block GEMM (block_gemm.h) in AVX-512 registers. Compiled with -mavx512f (CMakeLists.txt); called
// only where the CPU has AVX-512.
#include "block_gemm.h"

#ifdef UNLEARN_FAST_X86_KERNELS
#include <immintrin.h>

#include "block_gemm_kernel.h"

namespace unlearn_fast {
namespace cpu {
namespace {

struct Avx512 {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;
  static constexpr int kPanel = 4;  // 64 columns a panel
  // 24 of the 32 registers hold accumulators: 6 x 4 vectors, or 12 x 2 for narrow panels (n = R = 32).
  // (8 x 3 tiles, which would spare the 2-row tail tiles at m = R = 32, measured slower.)
  static constexpr int tile_rows(int vectors) { return vectors >= 3 ? 6 : 12; }
  static Mask first_lanes(int lanes) { return static_cast<Mask>((1u << lanes) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_masked(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static V broadcast(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static void store_masked(float* p, Mask m, V x) { _mm512_mask_storeu_ps(p, m, x); }
  static void stream(float* p, V x) { _mm512_stream_ps(p, x); }
  static void fence() { _mm_sfence(); }
};

}  // namespace

void block_gemm_avx512(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                       const float* bias, bool stream) {
  gemm_tiled<Avx512>(m, n, k, A, B, C, ldc, init, bias, stream);
}

}  // namespace cpu
}  // namespace unlearn_fast
#endif

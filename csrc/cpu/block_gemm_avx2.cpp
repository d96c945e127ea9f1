// The block GEMM (block_gemm.h) in AVX2 registers with FMA. Compiled with -mavx2 -mfma (CMakeLists.txt);
// called only where the CPU has both.
#include "block_gemm.h"

#ifdef UNLEARN_FAST_X86_KERNELS
#include <immintrin.h>

#include "block_gemm_kernel.h"

namespace unlearn_fast {
namespace cpu {
namespace {

struct Avx2 {
  using V = __m256;
  using Mask = __m256i;  // lanes to load / store: all bits set
  static constexpr int kWidth = 8;
  static constexpr int kPanel = 2;  // 16 columns a panel
  // 16 registers: 6 x 2 accumulators + 2 of B + 1 broadcast, or 12 x 1 for a one-vector tail panel.
  static constexpr int tile_rows(int vectors) { return vectors >= 2 ? 6 : 12; }
  static Mask first_lanes(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_masked(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static V broadcast(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static void store_masked(float* p, Mask m, V x) { _mm256_maskstore_ps(p, m, x); }
  static void stream(float* p, V x) { _mm256_stream_ps(p, x); }
  static void fence() { _mm_sfence(); }
};

}  // namespace

void block_gemm_avx2(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                     const float* bias, bool stream) {
  gemm_tiled<Avx2>(m, n, k, A, B, C, ldc, init, bias, stream);
}

}  // namespace cpu
}  // namespace unlearn_fast
#endif

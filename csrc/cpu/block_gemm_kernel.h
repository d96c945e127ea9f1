// The register-tiled block GEMM of block_gemm.h, written once over a vector type. Included only by
// block_gemm_avx512.cpp and block_gemm_avx2.cpp, each compiled for its instruction set, each with its
// own `Ops` (vector type, width, masked loads and stores).
//
// A tile of C, MR rows by NV vectors, lives in MR * NV accumulator registers; per step p it loads NV
// vectors of B's row p and broadcasts MR values of A's column p. Nothing is packed: at these sizes a
// BLAS spends a large share of each call packing (~30 % for MKL on Zen 4), and operands of ~50-row
// blocks stay in L1/L2 anyway. With kMasked the last vector of the tile holds only the lanes in
// `last`; with kStream C is written with non-temporal stores.
//
// Everything here has internal linkage (an anonymous namespace, no standard-library calls): code
// compiled with -mavx512f must not be what the linker picks for a function another file also uses.
#pragma once

#include <cstdint>

#include "block_gemm.h"

#define UNLEARN_FAST_KERNEL_INLINE inline __attribute__((always_inline))

namespace unlearn_fast {
namespace cpu {
namespace {

template <class Ops, bool kMasked>
UNLEARN_FAST_KERNEL_INLINE typename Ops::V load_lanes(const float* p, bool is_last, typename Ops::Mask last) {
  if constexpr (kMasked) {
    if (is_last) return Ops::load_masked(p, last);
  }
  return Ops::load(p);
}

template <class Ops, int MR, int NV, bool kMasked, bool kStream>
UNLEARN_FAST_KERNEL_INLINE void gemm_tile(int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc, RowMajor init,
                                          const float* bias, typename Ops::Mask last) {
  using V = typename Ops::V;
  constexpr int W = Ops::kWidth;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = init.p ? load_lanes<Ops, kMasked>(init.p + i * init.ld + W * v, v == NV - 1, last) : Ops::zero();
      if (bias) acc[i][v] = Ops::add(acc[i][v], load_lanes<Ops, kMasked>(bias + W * v, v == NV - 1, last));
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load_lanes<Ops, kMasked>(B.p + p * B.ld + W * v, v == NV - 1, last);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V a = Ops::broadcast(A.p[i * A.rs + p * A.cs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Ops::fmadd(a, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* out = C + i * ldc + W * v;
      if constexpr (kMasked) {
        if (v == NV - 1) {
          Ops::store_masked(out, last, acc[i][v]);
          continue;
        }
      }
      if constexpr (kStream) {
        Ops::stream(out, acc[i][v]);
      } else {
        Ops::store(out, acc[i][v]);
      }
    }
  }
}

// The last `rows` (< MR) rows of a panel as one tile of that height.
template <class Ops, int MaxRows, int NV, bool kMasked, bool kStream>
UNLEARN_FAST_KERNEL_INLINE void gemm_row_tail(int64_t rows, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc,
                                              RowMajor init, const float* bias, typename Ops::Mask last) {
  if constexpr (MaxRows > 0) {
    if (rows == MaxRows) {
      gemm_tile<Ops, MaxRows, NV, kMasked, kStream>(k, A, B, C, ldc, init, bias, last);
    } else {
      gemm_row_tail<Ops, MaxRows - 1, NV, kMasked, kStream>(rows, k, A, B, C, ldc, init, bias, last);
    }
  }
}

// All m rows of one panel of NV vectors (Ops::tile_rows(NV) rows a tile).
template <class Ops, int NV, bool kMasked, bool kStream>
UNLEARN_FAST_KERNEL_INLINE void gemm_panel(int64_t m, int64_t k, StridedA A, RowMajor B, float* C, int64_t ldc,
                                           RowMajor init, const float* bias, typename Ops::Mask last) {
  constexpr int MR = Ops::tile_rows(NV);
  auto shift = [](RowMajor t, int64_t rows) { return RowMajor{t.p ? t.p + rows * t.ld : nullptr, t.ld}; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    gemm_tile<Ops, MR, NV, kMasked, kStream>(k, {A.p + i * A.rs, A.rs, A.cs}, B, C + i * ldc, ldc, shift(init, i),
                                             bias, last);
  }
  gemm_row_tail<Ops, MR - 1, NV, kMasked, kStream>(m - i, k, {A.p + i * A.rs, A.rs, A.cs}, B, C + i * ldc, ldc,
                                                   shift(init, i), bias, last);
}

// The last columns (fewer than a full panel): NV = 1..Ops::kPanel vectors, the last one masked.
template <class Ops, int NV>
UNLEARN_FAST_KERNEL_INLINE void gemm_column_tail(int vectors, int64_t m, int64_t k, StridedA A, RowMajor B, float* C,
                                                 int64_t ldc, RowMajor init, const float* bias,
                                                 typename Ops::Mask last) {
  if constexpr (NV > 0) {
    if (vectors == NV) {
      gemm_panel<Ops, NV, true, false>(m, k, A, B, C, ldc, init, bias, last);
    } else {
      gemm_column_tail<Ops, NV - 1>(vectors, m, k, A, B, C, ldc, init, bias, last);
    }
  }
}

template <class Ops>
UNLEARN_FAST_KERNEL_INLINE void gemm_tiled(int64_t m, int64_t n, int64_t k, StridedA A, RowMajor B, float* C,
                                           int64_t ldc, RowMajor init, const float* bias, bool stream) {
  constexpr int W = Ops::kWidth, P = Ops::kPanel;
  auto shift = [](RowMajor t, int64_t cols) { return RowMajor{t.p ? t.p + cols : nullptr, t.ld}; };
  // non-temporal stores need whole aligned vectors: C aligned to a vector, every row too
  stream = stream && reinterpret_cast<uintptr_t>(C) % (W * sizeof(float)) == 0 && ldc % W == 0;
  const typename Ops::Mask none{};
  int64_t j = 0;
  for (; j + P * W <= n; j += P * W) {
    const float* bias_j = bias ? bias + j : nullptr;
    if (stream) {
      gemm_panel<Ops, P, false, true>(m, k, A, shift(B, j), C + j, ldc, shift(init, j), bias_j, none);
    } else {
      gemm_panel<Ops, P, false, false>(m, k, A, shift(B, j), C + j, ldc, shift(init, j), bias_j, none);
    }
  }
  if (stream) Ops::fence();  // order the non-temporal stores before anything that follows
  const int64_t rest = n - j;
  if (rest == 0) return;
  const int vectors = static_cast<int>((rest + W - 1) / W);
  gemm_column_tail<Ops, P>(vectors, m, k, A, shift(B, j), C + j, ldc, shift(init, j), bias ? bias + j : nullptr,
                           Ops::first_lanes(static_cast<int>(rest - (vectors - 1) * W)));
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_fast

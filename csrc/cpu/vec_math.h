// Branch-free float math shared by the CPU kernels, written so that loops calling it vectorise
// (std::exp / std::erf calls stop GCC from vectorising a loop).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define UNLEARN_FAST_INLINE inline __attribute__((always_inline))
#else
#define UNLEARN_FAST_INLINE inline
#endif

namespace unlearn_fast {
namespace cpu {

// exp(x) for float, Cephes-style: range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial,
// about 1 ulp. x < -87 gives 0 (the true value is < 1.7e-38), x > 88 is clamped to exp(88), and
// NaN stays NaN (comparisons with NaN are false).
UNLEARN_FAST_INLINE float vexp(float x) {
  const float xc = x > 88.0f ? 88.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n < -126.0f ? -126.0f : n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return xc < -87.0f ? 0.0f : y;
}

}  // namespace cpu
}  // namespace unlearn_fast

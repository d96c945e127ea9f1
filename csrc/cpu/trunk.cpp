// Fused CPU kernels for the frozen trunk of Llama-family models: RMSNorm and the SwiGLU product of
// the MLP, forward and backward (contract: unlearn_fast/ops/trunk.py, *_reference).
//
// Eager PyTorch runs RMSNorm as about eight elementwise passes over the activation (cast, square,
// mean, add, rsqrt, two products, cast back) and its backward as as many again; silu(gate) * up is
// three passes forward and five backward. Each kernel here is one pass over its rows (RMSNorm: the
// row is re-read from L1/L2 for the second half), float32 throughout. The weights are frozen, so no
// weight gradient is computed; the Python layer runs the reference where one is needed.
//
// The loops are plain C++ that GCC vectorises; on x86 each kernel is also compiled for x86-64-v3
// (AVX2 + FMA) and the loader picks that clone where the CPU has it (function multi-versioning).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "vec_math.h"

#if defined(UNLEARN_FAST_X86_KERNELS) && defined(__GNUC__) && !defined(__clang__)
#define UNLEARN_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define UNLEARN_FAST_CLONES
#endif

namespace unlearn_fast {

namespace {

using cpu::vexp;

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
                   ": the CPU kernel takes float32 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [N, d] tensor");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [", x.size(1), "], got ",
                    weight.sizes());
}

UNLEARN_FAST_CLONES
void rms_norm_rows(const float* x, const float* w, float* y, float* rstd, int64_t begin, int64_t end, int64_t d,
                   float eps) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * d;
    float* yi = y + i * d;
    float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t j = 0; j < d; ++j) sum_sq += xi[j] * xi[j];
    const float r = 1.f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
    rstd[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yi[j] = w[j] * (xi[j] * r);
  }
}

// x̂ = x·r, y = w ⊙ x̂:  dx = r · (w ⊙ dy − x̂ · mean(w ⊙ dy ⊙ x̂))
UNLEARN_FAST_CLONES
void rms_norm_backward_rows(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                            int64_t begin, int64_t end, int64_t d) {
  for (int64_t i = begin; i < end; ++i) {
    const float* dyi = dy + i * d;
    const float* xi = x + i * d;
    float* dxi = dx + i * d;
    const float r = rstd[i];
    float dot = 0.f;  // Σ w·dy·x (times r below)
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < d; ++j) dot += w[j] * dyi[j] * xi[j];
    const float c = dot * r * r / static_cast<float>(d);  // x̂ · mean(w·dy·x̂) = x · c
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) dxi[j] = r * (w[j] * dyi[j] - xi[j] * c);
  }
}

UNLEARN_FAST_CLONES
void swiglu_span(const float* g, const float* u, float* h, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float sig = 1.f / (1.f + vexp(-g[i]));
    h[i] = g[i] * sig * u[i];
  }
}

// h = silu(g)·u:  dh/du = silu(g),  dh/dg = u·σ(g)·(1 + g·(1 − σ(g)))
UNLEARN_FAST_CLONES
void swiglu_backward_span(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t begin,
                          int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float sig = 1.f / (1.f + vexp(-g[i]));
    const float silu = g[i] * sig;
    du[i] = dh[i] * silu;
    dg[i] = dh[i] * u[i] * sig * (1.f + g[i] * (1.f - sig));
  }
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
                   ": the CPU kernel takes float32 tensors, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), op, ": shapes differ, ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK_VALUE(a.is_contiguous() && b.is_contiguous(), op, ": tensors must be contiguous");
}

constexpr int64_t kRowGrain = 16;
constexpr int64_t kElementGrain = 16384;

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm_forward");
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({n}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = weight.const_data_ptr<float>();
  float *yp = y.mutable_data_ptr<float>(), *rp = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    rms_norm_rows(xp, wp, yp, rp, begin, end, d, static_cast<float>(eps));
  });
  return {y, rstd};
}

at::Tensor rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& rstd) {
  check_rows(x, weight, "rms_norm_backward");
  check_pair(grad_y, x, "rms_norm_backward");
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == x.size(0),
                    "rms_norm_backward: rstd must be float32 [", x.size(0), "]");
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor dx = at::empty_like(x);
  const float *gp = grad_y.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  const float *wp = weight.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  float* dxp = dx.mutable_data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    rms_norm_backward_rows(gp, xp, wp, rp, dxp, begin, end, d);
  });
  return dx;
}

at::Tensor swiglu_forward_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up, "swiglu_forward");
  at::Tensor h = at::empty_like(gate);
  const float *gp = gate.const_data_ptr<float>(), *up_ = up.const_data_ptr<float>();
  float* hp = h.mutable_data_ptr<float>();
  at::parallel_for(0, gate.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    swiglu_span(gp, up_, hp, begin, end);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_h, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_pair(gate, up, "swiglu_backward");
  check_pair(grad_h, gate, "swiglu_backward");
  at::Tensor dg = at::empty_like(gate), du = at::empty_like(up);
  const float *hp = grad_h.const_data_ptr<float>(), *gp = gate.const_data_ptr<float>();
  const float* up_ = up.const_data_ptr<float>();
  float *dgp = dg.mutable_data_ptr<float>(), *dup = du.mutable_data_ptr<float>();
  at::parallel_for(0, gate.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    swiglu_backward_span(hp, gp, up_, dgp, dup, begin, end);
  });
  return {dg, du};
}

// Shapes only, for torch.compile and opcheck.
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return {at::empty_like(x), at::empty({x.size(0)}, x.options())};
}
at::Tensor rms_norm_backward_meta(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& rstd) {
  return at::empty_like(x);
}
at::Tensor swiglu_forward_meta(const at::Tensor& gate, const at::Tensor& up) { return at::empty_like(gate); }
std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor& grad_h, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  return {at::empty_like(gate), at::empty_like(up)};
}

}  // namespace unlearn_fast

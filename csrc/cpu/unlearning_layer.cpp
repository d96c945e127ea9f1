// The unlearning-layer op on the CPU: K bottleneck adapters summed on the residual, forward and backward.
//
//   y = x + sum_k U_k act(D_k x + b_k) + c_k
//
// The caller concatenates the K layers: D = [D_1; ...; D_K] is [R, d] (R = sum of the ranks),
// b is [R], U = [U_1 ... U_K] is [d, R] and c = sum_k c_k is [d]. Then, with h = x D^T + b ([N, R]):
//
//   forward:  y = x + c + act(h) U^T
//   backward: dU = g^T act(h),  dh = (g U) * act'(h),  db = sum_rows dh,
//             dD = dh^T x,       dx = g + dh D,          dc = sum_rows g      (g = dL/dy)
//
// All K layers share one activation (a block's layers always do). The six GEMMs (two forward, four
// backward) go to at::mm / addmm (MKL or OpenBLAS); everything else is one fused pass per step, so the
// [N, d] tensors are touched as few times as the math allows: forward reads x twice (down GEMM,
// residual add) and writes y once; backward reads g three times (two GEMMs and one pass that both
// copies it into dx and sums its columns) and x once. The eager composition (Linear, act, Linear, add per layer) instead makes K
// passes of every kind. Only the pre-activation h ([N, R], fp32) is saved for backward; act(h) is
// recomputed there in the same pass that forms dh.
//
// x (and g) may be float32, bfloat16 or float16; all arithmetic is float32 (bias sums in double) and
// y / dx come back in x's dtype. Weights must be float32.
// unlearn_fast/ops/unlearning_layer.py::unlearning_layer_reference is the same contract in PyTorch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include "vec_math.h"
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace unlearn_fast {

namespace {

enum class Act { kRelu, kGelu, kSilu };

Act parse_activation(c10::string_view name) {
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "unlearn_fast.unlearning_layer: unknown activation '", std::string(name),
                    "'; choose relu, gelu or silu");
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define UNLEARN_FAST_SPAN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UNLEARN_FAST_SPAN_CLONES
#endif
// The helpers must be inlined into each clone to be compiled for its instruction set.

using cpu::vexp;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Phi(h) = (1 + erf(h / sqrt 2)) / 2, the standard normal CDF, for the exact (erf) gelu. erf by
// Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the polynomial ATen's vectorised erf uses);
// the tail is formed directly (not as 1 - (1 - tail)), so Phi keeps its relative accuracy for h << 0.
UNLEARN_FAST_INLINE float normal_cdf(float h) {
  const float z = (h < 0.f ? -h : h) * kInvSqrt2;
  const float t = 1.f / (1.f + 0.3275911f * z);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float tail = 0.5f * poly * vexp(-z * z);  // Phi(-|h|)
  return h < 0.f ? tail : 1.f - tail;
}

// act(h); gelu is the exact (erf) form, as torch.nn.functional.gelu's default.
template <Act A>
UNLEARN_FAST_INLINE float act_value(float h) {
  if constexpr (A == Act::kRelu) {
    return h > 0.f ? h : 0.f;
  } else if constexpr (A == Act::kGelu) {
    return h * normal_cdf(h);
  } else {
    return h / (1.f + vexp(-h));
  }
}

// act'(h) (backward also recomputes act(h) for dU). relu'(0) = 0, as torch's threshold_backward.
template <Act A>
UNLEARN_FAST_INLINE float act_slope(float h) {
  if constexpr (A == Act::kRelu) {
    return h > 0.f ? 1.f : 0.f;
  } else if constexpr (A == Act::kGelu) {
    return normal_cdf(h) + h * kInvSqrt2Pi * vexp(-0.5f * h * h);
  } else {
    const float s = 1.f / (1.f + vexp(-h));
    return s * (1.f + h * (1.f - s));
  }
}

template <Act A>
UNLEARN_FAST_INLINE void forward_span(const float* h, float* a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = act_value<A>(h[i]);
}

// a = act(h) over a span of [rows, R] elements.
UNLEARN_FAST_SPAN_CLONES
void activation_forward_span(Act act, const float* h, float* a, int64_t n) {
  switch (act) {
    case Act::kRelu: forward_span<Act::kRelu>(h, a, n); break;
    case Act::kGelu: forward_span<Act::kGelu>(h, a, n); break;
    case Act::kSilu: forward_span<Act::kSilu>(h, a, n); break;
  }
}

template <Act A>
UNLEARN_FAST_INLINE void backward_rows(const float* h, float* a, float* da, double* colsum, int64_t rows, int64_t R) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* hr = h + i * R;
    float* ar = a + i * R;
    float* dr = da + i * R;
#pragma omp simd
    for (int64_t j = 0; j < R; ++j) {
      ar[j] = act_value<A>(hr[j]);
      dr[j] *= act_slope<A>(hr[j]);
      colsum[j] += dr[j];
    }
  }
}

// Over [rows, R]: a = act(h); da <- da * act'(h) (it becomes dh); colsum += column sums of dh.
UNLEARN_FAST_SPAN_CLONES
void activation_backward_rows(Act act, const float* h, float* a, float* da, double* colsum, int64_t rows, int64_t R) {
  switch (act) {
    case Act::kRelu: backward_rows<Act::kRelu>(h, a, da, colsum, rows, R); break;
    case Act::kGelu: backward_rows<Act::kGelu>(h, a, da, colsum, rows, R); break;
    case Act::kSilu: backward_rows<Act::kSilu>(h, a, da, colsum, rows, R); break;
  }
}

// Rows per parallel task for a loop over [n, width] elements: about 32K elements per task.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// a = act(h), elementwise over [n, R].
void activation_forward(Act act, const at::Tensor& h, at::Tensor& a) {
  const int64_t n = h.size(0), R = h.size(1);
  const float* hp = h.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  at::parallel_for(0, n, row_grain(R), [&](int64_t begin, int64_t end) {
    activation_forward_span(act, hp + begin * R, ap + begin * R, (end - begin) * R);
  });
}

// One pass over [n, R]: a = act(h); da <- da * act'(h) in place (it becomes dh); db = column sums of dh.
void activation_backward(Act act, const at::Tensor& h, at::Tensor& a, at::Tensor& da, at::Tensor& db) {
  const int64_t n = h.size(0), R = h.size(1);
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * R, 0.0);  // per-thread column sums
  at::parallel_for(0, n, row_grain(R), [&](int64_t begin, int64_t end) {
    double* sum = partial.data() + static_cast<int64_t>(at::get_thread_num()) * R;
    activation_backward_rows(act, h.data_ptr<float>() + begin * R, a.data_ptr<float>() + begin * R,
                             da.data_ptr<float>() + begin * R, sum, end - begin, R);
  });
  float* dbp = db.data_ptr<float>();
  for (int64_t j = 0; j < R; ++j) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * R + j];
    dbp[j] = static_cast<float>(total);
  }
}

// One pass over g [n, d]: dc = column sums of g, and (when dx is defined) dx = g, the residual's share
// of the input gradient, which the dh D GEMM then accumulates onto.
void residual_backward(const at::Tensor& g, at::Tensor* dx, at::Tensor& dc) {
  const int64_t n = g.size(0), d = g.size(1);
  const float* gp = g.data_ptr<float>();
  float* xp = dx ? dx->data_ptr<float>() : nullptr;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * d, 0.0);
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    double* sum = partial.data() + static_cast<int64_t>(at::get_thread_num()) * d;
    for (int64_t i = begin; i < end; ++i) {
      const float* row = gp + i * d;
      if (xp) std::copy(row, row + d, xp + i * d);
      for (int64_t j = 0; j < d; ++j) sum[j] += row[j];
    }
  });
  float* dcp = dc.data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * d + j];
    dcp[j] = static_cast<float>(total);
  }
}

void check_float_input(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), "unlearn_fast.unlearning_layer: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "unlearn_fast.unlearning_layer: ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && t.size(1) == cols,
              "unlearn_fast.unlearning_layer: ", name, " must have shape [", rows < 0 ? "N" : std::to_string(rows),
              ", ", cols, "], got ", t.sizes());
}

void check_weight(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "unlearn_fast.unlearning_layer: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "unlearn_fast.unlearning_layer: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "unlearn_fast.unlearning_layer: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// Shapes shared by forward and backward: d from x, R from the down-projection.
std::pair<int64_t, int64_t> check_shapes(const at::Tensor& x, const at::Tensor& down_weight) {
  TORCH_CHECK(x.dim() == 2, "unlearn_fast.unlearning_layer: x must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK(down_weight.dim() == 2, "unlearn_fast.unlearning_layer: down_weight must be 2-D [R, d], got shape ",
              down_weight.sizes());
  return {x.size(1), down_weight.size(0)};
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> unlearning_layer_forward_cpu(const at::Tensor& x, const at::Tensor& down_weight,
                                                                const at::Tensor& down_bias,
                                                                const at::Tensor& up_weight,
                                                                const at::Tensor& up_bias,
                                                                c10::string_view activation) {
  const auto [d, R] = check_shapes(x, down_weight);
  check_float_input(x, "x", -1, d);
  check_weight(down_weight, "down_weight", {R, d});
  check_weight(down_bias, "down_bias", {R});
  check_weight(up_weight, "up_weight", {d, R});
  check_weight(up_bias, "up_bias", {d});
  const Act act = parse_activation(activation);

  const at::Tensor x32 = as_float(x);
  const at::Tensor pre = at::addmm(down_bias, x32, down_weight.t());  // h = x D^T + b: one GEMM for all K
  at::Tensor a = at::empty_like(pre);
  activation_forward(act, pre, a);
  at::Tensor y = at::add(x32, up_bias);  // x + c, one pass
  y.addmm_(a, up_weight.t());            // += act(h) U^T, accumulated by the GEMM in place (beta = 1)
  return {x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()), pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearning_layer_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& down_weight,
    const at::Tensor& up_weight, c10::string_view activation, bool compute_grad_x) {
  const auto [d, R] = check_shapes(x, down_weight);
  check_float_input(x, "x", -1, d);
  const int64_t n = x.size(0);
  check_float_input(grad_y, "grad_y", n, d);
  check_weight(pre, "pre", {n, R});
  check_weight(down_weight, "down_weight", {R, d});
  check_weight(up_weight, "up_weight", {d, R});
  const Act act = parse_activation(activation);

  const at::Tensor g = as_float(grad_y);
  const at::Tensor h = pre.contiguous();
  at::Tensor dh = at::mm(g, up_weight);  // g U, turned into dh in place below
  at::Tensor a = at::empty_like(h);
  at::Tensor grad_down_bias = at::empty({R}, h.options());
  activation_backward(act, h, a, dh, grad_down_bias);
  at::Tensor grad_up_weight = at::mm(g.t(), a);             // [d, R]
  at::Tensor grad_down_weight = at::mm(dh.t(), as_float(x));  // [R, d]
  at::Tensor grad_up_bias = at::empty({d}, h.options());
  at::Tensor grad_x;
  if (compute_grad_x) {
    grad_x = at::empty({n, d}, h.options());
    residual_backward(g, &grad_x, grad_up_bias);
    grad_x.addmm_(dh, down_weight);  // += dh D
    if (x.scalar_type() != at::kFloat) grad_x = grad_x.to(x.scalar_type());
  } else {
    residual_backward(g, nullptr, grad_up_bias);
    grad_x = at::empty({0}, x.options());
  }
  return {grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias};
}

// Shapes only, for torch.compile / FakeTensor / torch.library.opcheck (registered for the Meta key).
std::tuple<at::Tensor, at::Tensor> unlearning_layer_forward_meta(const at::Tensor& x, const at::Tensor& down_weight,
                                                                 const at::Tensor& down_bias,
                                                                 const at::Tensor& up_weight,
                                                                 const at::Tensor& up_bias,
                                                                 c10::string_view activation) {
  const auto [d, R] = check_shapes(x, down_weight);
  return {at::empty({x.size(0), d}, x.options()), at::empty({x.size(0), R}, down_weight.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearning_layer_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& down_weight,
    const at::Tensor& up_weight, c10::string_view activation, bool compute_grad_x) {
  const auto [d, R] = check_shapes(x, down_weight);
  const auto w = down_weight.options();
  return {compute_grad_x ? at::empty({x.size(0), d}, x.options()) : at::empty({0}, x.options()),
          at::empty({R, d}, w), at::empty({R}, w), at::empty({d, R}, w), at::empty({d}, w)};
}

}  // namespace unlearn_fast

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
// All K layers share one activation (a block's layers always do). The six GEMMs, 2 N d R FLOPs each,
// are nearly all of the work, and their shapes are skinny (R = 32..128 next to d = 576). Six
// whole-matrix BLAS calls with elementwise passes between them stream every [N, d] operand several
// times and pay the BLAS's packing per call; here both passes run over blocks of rows instead:
//
//   forward,  per block: h = x D^T + b, a = act(h), y = x + c + a U^T
//   backward, per block: da = g U, dh = da * act'(h), dx = g + dh D,
//                        dU^T += a^T g, dD += dh^T x, db += sum_rows dh, dc += sum_rows g
//
// A block's [rows, d] tiles of x and g are used while they sit in the core's L2, the bottleneck lives
// in a per-thread [rows, R] buffer, and y and dx are written once, past the caches (stream_output).
// The block GEMMs (block_gemm.h) are small register-tiled AVX-512 or AVX2 kernels that read their
// operands in place; the weight-gradient GEMMs accumulate into per-chunk accumulators (see
// for_each_block), summed at the end.
// At N = 2048, d = 576, R = 32, on 2 Zen 4 cores, forward + backward takes ~2.7 ms (~170 GFLOP/s,
// ~75 % of the FMA peak); the six GEMMs alone, as whole-matrix MKL calls, sum to ~2.7 ms, and the
// previous version (those calls plus fused elementwise passes) took ~4.4 ms.
//
// Only the pre-activation h ([N, R], fp32) is saved for backward; act(h) is recomputed there.
// x (and g) may be float32, bfloat16 or float16; all arithmetic is float32 (bias-gradient sums over
// blocks in double) and y / dx come back in x's dtype. Weights must be float32.
// unlearn_fast/ops/unlearning_layer.py::unlearning_layer_reference is the same contract in PyTorch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "block_gemm.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cstdint>
#include <cstring>
#include <string>
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

template <Act A>
UNLEARN_FAST_INLINE void forward_rows(const float* h, float* a, int64_t rows, int64_t R) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < R; ++j) a[i * R + j] = act_value<A>(h[i * R + j]);
  }
}

// a = act(h) over [rows, R].
UNLEARN_FAST_SPAN_CLONES
void activation_forward_rows(Act act, const float* h, float* a, int64_t rows, int64_t R) {
  switch (act) {
    case Act::kRelu: forward_rows<Act::kRelu>(h, a, rows, R); break;
    case Act::kGelu: forward_rows<Act::kGelu>(h, a, rows, R); break;
    case Act::kSilu: forward_rows<Act::kSilu>(h, a, rows, R); break;
  }
}

// colsum += column sums of g [rows, d]: summed over the block in float (vectorised), then added to the
// double accumulator once per block.
UNLEARN_FAST_SPAN_CLONES
void column_sums(const float* g, double* colsum, int64_t rows, int64_t d) {
  constexpr int64_t kCols = 256;
  for (int64_t j0 = 0; j0 < d; j0 += kCols) {
    const int64_t w = std::min(kCols, d - j0);
    float part[kCols] = {};
    for (int64_t i = 0; i < rows; ++i) {
      const float* row = g + i * d + j0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) part[j] += row[j];
    }
    for (int64_t j = 0; j < w; ++j) colsum[j0 + j] += part[j];
  }
}

using cpu::block_gemm;
using cpu::GemmKernel;
using cpu::RowMajor;
using cpu::StridedA;

// ---- Blocks of rows over threads -------------------------------------------------------------------
// Rows per block: a [rows, d] tile is ~128 KiB, so the tiles a block works on, its [rows, R] buffers
// and the weight-gradient accumulators stay in a 1 MiB L2 for R up to ~128. A multiple of 12, so of
// the GEMM kernel's tile heights (6, 12).
int64_t block_rows(int64_t d) { return std::clamp<int64_t>(32768 / std::max<int64_t>(d, 1) / 12 * 12, 12, 504); }

// Whether to write an [n, d] fp32 output (y, dx) with non-temporal stores. An output of a few MiB
// goes out to memory anyway (on the 2-core test machine, whose L3 other tenants share, writing a
// 4.7 MiB y ran at DRAM speed), and ordinary stores first read every line they write, stalling the
// GEMM that stores: streaming y and dx made forward and backward ~20 % faster at N = 2048, d = 576,
// R = 32 (measured interleaved). Small outputs stay cached for their consumer.
bool stream_output(int64_t n, int64_t d) { return n * d * static_cast<int64_t>(sizeof(float)) >= (2 << 20); }

struct Blocks {
  int64_t n, rows, count;  // count blocks of `rows` rows (the last one shorter) cover n rows
  int64_t chunks;          // runs of consecutive blocks, each with its own gradient accumulators
  int64_t workers;         // threads, each with its own scratch buffers
};

Blocks plan_blocks(int64_t n, int64_t d) {
  Blocks b;
  b.n = n;
  b.rows = block_rows(d);
  b.count = (n + b.rows - 1) / b.rows;
  const int64_t threads = at::get_num_threads();
  b.chunks = std::max<int64_t>(1, std::min(b.count, 4 * threads));
  b.workers = std::min(b.chunks, threads);
  return b;
}

// fn(worker, chunk, first_of_chunk, first_row, rows) for every block. One parallel region of `workers`
// threads, which take chunks from a shared counter: when other processes hold a core (a shared
// machine, two jobs at once), the threads that run take the chunks a stalled one would have had, and
// the region waits for at most the stalled thread's current chunk, not for a fixed half of the work.
// A chunk's blocks always run in order into the chunk's own accumulators, summed in chunk order
// afterwards, so results are the same whichever thread runs which chunk, and whether the region runs
// in parallel or not (nested inside another parallel region it runs serially).
template <typename F>
void for_each_block(const Blocks& b, const F& fn) {
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, b.workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t w = worker_begin; w < worker_end; ++w) {
      for (int64_t c = next_chunk++; c < b.chunks; c = next_chunk++) {
        const int64_t chunk_begin = c * b.count / b.chunks;
        for (int64_t blk = chunk_begin; blk < (c + 1) * b.count / b.chunks; ++blk) {
          const int64_t first = blk * b.rows;
          fn(w, c, blk == chunk_begin, first, std::min(b.rows, b.n - first));
        }
      }
    }
  });
}

// Scratch memory kept for the next call on the same calling thread. Fresh buffers of a few hundred KiB
// to a few MiB per call (the weight-gradient accumulators, the transposed weights) come back from
// malloc as new pages, and their page faults cost ~0.2 ms a step at N = 2048, d = 576. Holds the
// largest call's scratch; float offsets handed out in multiples of 16 keep every piece 64-byte aligned.
class Workspace {
 public:
  explicit Workspace(size_t floats) {
    thread_local std::vector<float> memory;
    if (memory.size() < floats + 16) memory.resize(floats + 16);
    const auto address = reinterpret_cast<uintptr_t>(memory.data());
    next_ = memory.data() + (64 - address % 64) % 64 / sizeof(float);
  }
  float* take(size_t floats) {
    float* p = next_;
    next_ += (floats + 15) / 16 * 16;
    return p;
  }
  static size_t size(std::initializer_list<size_t> pieces) {
    size_t total = 0;
    for (size_t n : pieces) total += (n + 15) / 16 * 16;
    return total;
  }

 private:
  float* next_;
};

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
  const GemmKernel gemm = cpu::pick_gemm_kernel();

  const int64_t n = x.size(0);
  const at::Tensor x32 = as_float(x);
  const at::Tensor D = down_weight.contiguous(), U = up_weight.contiguous();
  const at::Tensor b = down_bias.contiguous(), c = up_bias.contiguous();
  at::Tensor y = at::empty({n, d}, x32.options());
  at::Tensor pre = at::empty({n, R}, x32.options());
  const float* xp = x32.const_data_ptr<float>();
  float *yp = y.data_ptr<float>(), *hp = pre.data_ptr<float>();

  const Blocks blocks = plan_blocks(n, d);
  const bool stream = stream_output(n, d);
  const size_t per_worker = blocks.rows * R;
  Workspace ws(Workspace::size({size_t(R * d), size_t(R * d), blocks.workers * per_worker}));
  // The GEMMs read B row-major: D^T [d, R] and U^T [R, d], transposed once per call.
  float *Dt = ws.take(R * d), *Ut = ws.take(R * d), *act_buf = ws.take(blocks.workers * per_worker);
  at::from_blob(Dt, {d, R}, at::kFloat).copy_(D.t());
  at::from_blob(Ut, {R, d}, at::kFloat).copy_(U.t());
  for_each_block(blocks, [&](int64_t w, int64_t, bool, int64_t first, int64_t rows) {
    const float* xb = xp + first * d;
    float* hb = hp + first * R;
    float* ab = act_buf + w * per_worker;  // act(h) of the block
    // h = x D^T + b: one GEMM for all K layers
    block_gemm(gemm, rows, R, d, {xb, d, 1}, {Dt, R}, hb, R, {}, b.const_data_ptr<float>());
    activation_forward_rows(act, hb, ab, rows, R);
    // y = x + c + a U^T
    block_gemm(gemm, rows, d, R, {ab, R, 1}, {Ut, d}, yp + first * d, d, {xb, d}, c.const_data_ptr<float>(), stream);
  });
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
  const GemmKernel gemm = cpu::pick_gemm_kernel();

  const at::Tensor g = as_float(grad_y), x32 = as_float(x), h = pre.contiguous();
  const at::Tensor D = down_weight.contiguous(), U = up_weight.contiguous();
  const float *gp = g.const_data_ptr<float>(), *xp = x32.const_data_ptr<float>(), *hp = h.const_data_ptr<float>();
  at::Tensor grad_x = compute_grad_x ? at::empty({n, d}, g.options()) : at::empty({0}, x.options());
  float* dxp = compute_grad_x ? grad_x.data_ptr<float>() : nullptr;

  const Blocks blocks = plan_blocks(n, d);
  const bool stream = stream_output(n, d);
  // Per-chunk accumulators: weight gradients in fp32 (as one whole-matrix GEMM accumulates; dU
  // transposed, [R, d], so its GEMM, like dD's, runs along d), written by a chunk's first block and
  // accumulated by the others; bias gradients in double.
  const int64_t C = blocks.chunks;
  const size_t per_worker = 2 * blocks.rows * R;
  Workspace ws(Workspace::size({size_t(C * R * d), size_t(C * R * d), blocks.workers * per_worker}));
  float *dUt_acc = ws.take(C * R * d), *dD_acc = ws.take(C * R * d), *work = ws.take(blocks.workers * per_worker);
  std::vector<double> db_acc(C * R, 0.0), dc_acc(C * d, 0.0);

  for_each_block(blocks, [&](int64_t w, int64_t c, bool first_of_chunk, int64_t first, int64_t rows) {
    const float* gb = gp + first * d;
    const float* xb = xp + first * d;
    float* dh = work + w * per_worker;
    float* ab = dh + blocks.rows * R;
    block_gemm(gemm, rows, R, d, {gb, d, 1}, {U.const_data_ptr<float>(), R}, dh, R);  // da = g U
    activation_backward_rows(act, hp + first * R, ab, dh, &db_acc[c * R], rows, R);  // a, dh = da act'(h), db
    column_sums(gb, &dc_acc[c * d], rows, d);                                         // dc
    if (dxp) {  // dx = g + dh D
      block_gemm(gemm, rows, d, R, {dh, R, 1}, {D.const_data_ptr<float>(), d}, dxp + first * d, d, {gb, d}, nullptr,
           stream);
    }
    // dU^T += a^T g, dD += dh^T x (a chunk's first block writes its accumulators)
    float* dUt = dUt_acc + c * R * d;
    float* dDc = dD_acc + c * R * d;
    block_gemm(gemm, R, d, rows, {ab, 1, R}, {gb, d}, dUt, d, first_of_chunk ? RowMajor{} : RowMajor{dUt, d});
    block_gemm(gemm, R, d, rows, {dh, 1, R}, {xb, d}, dDc, d, first_of_chunk ? RowMajor{} : RowMajor{dDc, d});
  });

  // Sum the chunks, in chunk order.
  const auto f32 = g.options(), f64 = g.options().dtype(at::kDouble);
  at::Tensor grad_down_weight = at::from_blob(dD_acc, {C, R, d}, f32).sum(0);
  at::Tensor grad_up_weight = at::from_blob(dUt_acc, {C, R, d}, f32).sum(0).t().contiguous();
  at::Tensor grad_down_bias = at::from_blob(db_acc.data(), {C, R}, f64).sum(0).to(at::kFloat);
  at::Tensor grad_up_bias = at::from_blob(dc_acc.data(), {C, d}, f64).sum(0).to(at::kFloat);
  if (compute_grad_x && x.scalar_type() != at::kFloat) grad_x = grad_x.to(x.scalar_type());
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

// loss_rows on CUDA: the per-chunk row kernel of the EUL loss head, same contract as
// csrc/cpu/loss_rows.cpp (see there, and unlearn_fast/ops/loss_head.py::loss_rows_reference).
//
// One block per row. Pass 1: each thread keeps online (running-max, rescaled sum) statistics over its
// strided columns; warps merge them with shuffles, the block through shared memory. Pass 2 writes the
// gradient row. Statistics are fp32.
//
// The file has two parts:
//   * the kernel and a launcher over raw pointers, which need only the CUDA headers, so
//       nvcc -c csrc/cuda/loss_rows.cu -o /tmp/loss_rows.o
//     compile-checks them on a machine whose torch has no CUDA;
//   * the torch-facing wrapper, compiled only with -DUNLEARN_FAST_WITH_TORCH (CMakeLists.txt sets it).
// Device-side, a target that is neither -100 nor in [0, V) gives ce = NaN and no CE gradient (checking
// on the host would need a synchronisation).

#include <cuda_runtime.h>

#include <cstdint>

namespace unlearn_fast {
namespace cuda_kernels {

constexpr int64_t kIgnoreIndex = -100;
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// exp((m - m_new) * scale) with exp(-inf - anything) = 0 and no NaN when both maxima are -inf.
__device__ __forceinline__ float rescale(float m, float m_new, float scale) {
  return m == neg_inf() ? 0.f : expf((m - m_new) * scale);
}

// Per-thread (then per-block) statistics of one row.
struct Stats {
  float m_s;  // max of s
  float z1;   // sum exp(s - m_s)
  float zT;   // sum exp((s - m_s) / T)
  float m_t;  // max of t
  float zt;   // sum exp((t - m_t) / T)
  float a;    // sum exp((t - m_t) / T) * (t - s)
};

template <bool kTeacher, bool kTempOne>
__device__ __forceinline__ void merge(Stats& x, const Stats& y, float invT) {
  const float m_s = fmaxf(x.m_s, y.m_s);
  x.z1 = x.z1 * rescale(x.m_s, m_s, 1.f) + y.z1 * rescale(y.m_s, m_s, 1.f);
  if (kTeacher && !kTempOne) x.zT = x.zT * rescale(x.m_s, m_s, invT) + y.zT * rescale(y.m_s, m_s, invT);
  x.m_s = m_s;
  if (kTeacher) {
    const float m_t = fmaxf(x.m_t, y.m_t);
    const float fx = rescale(x.m_t, m_t, invT), fy = rescale(y.m_t, m_t, invT);
    x.zt = x.zt * fx + y.zt * fy;
    x.a = x.a * fx + y.a * fy;
    x.m_t = m_t;
  }
}

template <bool kTeacher, bool kTempOne>
__device__ __forceinline__ Stats shfl_xor(const Stats& x, int lane_mask) {
  Stats y;
  y.m_s = __shfl_xor_sync(0xffffffffu, x.m_s, lane_mask);
  y.z1 = __shfl_xor_sync(0xffffffffu, x.z1, lane_mask);
  y.zT = (kTeacher && !kTempOne) ? __shfl_xor_sync(0xffffffffu, x.zT, lane_mask) : 0.f;
  if (kTeacher) {
    y.m_t = __shfl_xor_sync(0xffffffffu, x.m_t, lane_mask);
    y.zt = __shfl_xor_sync(0xffffffffu, x.zt, lane_mask);
    y.a = __shfl_xor_sync(0xffffffffu, x.a, lane_mask);
  } else {
    y.m_t = neg_inf();
    y.zt = y.a = 0.f;
  }
  return y;
}

template <bool kTeacher, bool kTempOne>
__device__ __forceinline__ void warp_merge(Stats& x, float invT) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) merge<kTeacher, kTempOne>(x, shfl_xor<kTeacher, kTempOne>(x, mask), invT);
}

template <bool kTeacher, bool kTempOne>
__global__ void __launch_bounds__(kBlock) loss_rows_kernel(
    const float* __restrict__ student, const float* __restrict__ teacher, const int64_t* __restrict__ targets,
    const float* __restrict__ kl_coef, const float* __restrict__ ce_coef, int64_t V, float kl_bound,
    float ce_bound, float T, bool guard, float* __restrict__ kl_out, float* __restrict__ ce_out,
    float* __restrict__ grad, float* __restrict__ kl_weight_out) {
  const int64_t row = blockIdx.x;
  const float* s = student + row * V;
  const float* t = kTeacher ? teacher + row * V : nullptr;
  float* g = grad + row * V;
  const float invT = 1.f / T;
  const int64_t target = targets[row];
  const bool has_ce = target != kIgnoreIndex;
  const bool bad_target = has_ce && (target < 0 || target >= V);

  // Pass 1: online statistics over this thread's columns.
  Stats st{neg_inf(), 0.f, 0.f, neg_inf(), 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < V; j += kBlock) {
    const float x = s[j];
    if (x > st.m_s) {
      st.z1 *= rescale(st.m_s, x, 1.f);
      if (kTeacher && !kTempOne) st.zT *= rescale(st.m_s, x, invT);
      st.m_s = x;
    }
    st.z1 += expf(x - st.m_s);
    if (kTeacher) {
      if (!kTempOne) st.zT += expf((x - st.m_s) * invT);
      const float y = t[j];
      if (y > st.m_t) {
        const float f = rescale(st.m_t, y, invT);
        st.zt *= f;
        st.a *= f;
        st.m_t = y;
      }
      const float e = expf((y - st.m_t) * invT);
      st.zt += e;
      st.a += e * (y - x);
    }
  }
  warp_merge<kTeacher, kTempOne>(st, invT);
  __shared__ Stats partial[kWarps];
  __shared__ float coef[2];  // the active KL coefficient times T, the active CE coefficient
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? partial[lane] : Stats{neg_inf(), 0.f, 0.f, neg_inf(), 0.f, 0.f};
    warp_merge<kTeacher, kTempOne>(st, invT);
    if (lane == 0) {
      if (kTempOne) st.zT = st.z1;
      partial[0] = st;
      float kl = 0.f, a_coef = 0.f, c = kl_coef[row];
      if (kTeacher) {
        // T * E_pt[t - s] + T^2 * (lse(s/T) - lse(t/T)), with the maxima subtracted first
        kl = T * (st.a / st.zt) + T * T * ((st.m_s - st.m_t) * invT + (logf(st.zT) - logf(st.zt)));
        if (guard && has_ce && !bad_target && c < 0.f) {
          // sharpening guard: log softmax(s/T)[target] > log softmax(t/T)[target] drops the KL term
          const float lp_s = (s[target] - st.m_s) * invT - logf(st.zT);
          const float lp_t = (t[target] - st.m_t) * invT - logf(st.zt);
          if (lp_s > lp_t) c = 0.f;
        }
        a_coef = (c != 0.f && (c >= 0.f || kl < kl_bound)) ? c * T : 0.f;
      }
      kl_weight_out[row] = c;
      float ce = 0.f, c_coef = 0.f;
      if (bad_target) {
        ce = __int_as_float(0x7fc00000);  // NaN
      } else if (has_ce) {
        ce = (st.m_s - s[target]) + logf(st.z1);
        const float c = ce_coef[row];
        c_coef = (c != 0.f && (c >= 0.f || ce < ce_bound)) ? c : 0.f;
      }
      kl_out[row] = kl;
      ce_out[row] = ce;
      coef[0] = a_coef;
      coef[1] = c_coef;
    }
  }
  __syncthreads();
  const Stats fin = partial[0];
  const float a_coef = coef[0], c_coef = coef[1];
  const float lz1 = logf(fin.z1);
  const float lzT = kTeacher ? logf(fin.zT) : 0.f;
  const float lzt = kTeacher ? logf(fin.zt) : 0.f;

  // Pass 2: the gradient row.
  for (int64_t j = threadIdx.x; j < V; j += kBlock) {
    const float ds = s[j] - fin.m_s;
    float v = 0.f;
    if (kTeacher && a_coef != 0.f) {
      const float pt = expf((t[j] - fin.m_t) * invT - lzt);
      if (kTempOne) {
        const float ps = expf(ds - lz1);
        v = a_coef * (ps - pt) + c_coef * ps;  // (ps - pt) first: exactly 0 where student == teacher
      } else {
        v = a_coef * (expf(ds * invT - lzT) - pt);
        if (c_coef != 0.f) v += c_coef * expf(ds - lz1);
      }
    } else if (c_coef != 0.f) {
      v = c_coef * expf(ds - lz1);
    }
    if (j == target) v -= c_coef;
    g[j] = v;
  }
}

template <bool kTeacher, bool kTempOne>
void launch(const float* student, const float* teacher, const int64_t* targets, const float* kl_coef,
            const float* ce_coef, int64_t n, int64_t V, float kl_bound, float ce_bound, float T, bool guard,
            float* kl, float* ce, float* grad, float* kl_weight, cudaStream_t stream) {
  loss_rows_kernel<kTeacher, kTempOne><<<static_cast<unsigned int>(n), kBlock, 0, stream>>>(
      student, teacher, targets, kl_coef, ce_coef, V, kl_bound, ce_bound, T, guard, kl, ce, grad, kl_weight);
}

}  // namespace cuda_kernels

// Raw-pointer launcher. teacher == nullptr: no KL term. All arrays contiguous on the current device:
// student/teacher/grad [n, V], targets/kl_coef/ce_coef/kl/ce/kl_weight [n]. Returns the launch error, if any.
cudaError_t launch_loss_rows(const float* student, const float* teacher, const int64_t* targets,
                             const float* kl_coef, const float* ce_coef, int64_t n, int64_t V, float kl_bound,
                             float ce_bound, float temperature, bool guard, float* kl, float* ce, float* grad,
                             float* kl_weight, cudaStream_t stream) {
  using namespace cuda_kernels;
  if (n <= 0) return cudaSuccess;
  if (n > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const bool temp_one = temperature == 1.0f;
  if (teacher == nullptr) {
    launch<false, true>(student, teacher, targets, kl_coef, ce_coef, n, V, kl_bound, ce_bound, temperature, guard,
                        kl, ce, grad, kl_weight, stream);
  } else if (temp_one) {
    launch<true, true>(student, teacher, targets, kl_coef, ce_coef, n, V, kl_bound, ce_bound, temperature, guard,
                       kl, ce, grad, kl_weight, stream);
  } else {
    launch<true, false>(student, teacher, targets, kl_coef, ce_coef, n, V, kl_bound, ce_bound, temperature, guard,
                        kl, ce, grad, kl_weight, stream);
  }
  return cudaGetLastError();
}

}  // namespace unlearn_fast

#ifdef UNLEARN_FAST_WITH_TORCH
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

namespace unlearn_fast {

// csrc/cpu/loss_rows.cpp: the argument checks shared with the CPU kernel.
void check_loss_rows_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                          const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                          double temperature, c10::DeviceType device);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_rows_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
    double temperature, bool sharpening_guard) {
  check_loss_rows_args(student_logits, teacher_logits, targets, kl_coef, ce_coef, temperature,
                       c10::DeviceType::CUDA);
  TORCH_CHECK(targets.device() == student_logits.device() && kl_coef.device() == student_logits.device() &&
                  ce_coef.device() == student_logits.device(),
              "unlearn_fast.loss_rows: all tensors must be on ", student_logits.device());
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const int64_t n = student_logits.size(0);
  const int64_t V = student_logits.size(1);
  at::Tensor kl = at::empty({n}, student_logits.options());
  at::Tensor ce = at::empty({n}, student_logits.options());
  at::Tensor grad = at::empty({n, V}, student_logits.options());
  at::Tensor kl_weight = at::empty({n}, student_logits.options());
  const cudaError_t err = launch_loss_rows(
      student_logits.data_ptr<float>(), teacher_logits.numel() ? teacher_logits.data_ptr<float>() : nullptr,
      targets.data_ptr<int64_t>(), kl_coef.data_ptr<float>(), ce_coef.data_ptr<float>(), n, V,
      static_cast<float>(kl_bound), static_cast<float>(ce_bound), static_cast<float>(temperature),
      sharpening_guard, kl.data_ptr<float>(), ce.data_ptr<float>(), grad.data_ptr<float>(),
      kl_weight.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "unlearn_fast.loss_rows: CUDA launch failed: ", cudaGetErrorString(err));
  return {kl, ce, grad, kl_weight};
}

}  // namespace unlearn_fast
#endif  // UNLEARN_FAST_WITH_TORCH

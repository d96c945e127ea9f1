// loss_rows on the CPU: the per-chunk row kernel of the EUL loss head.
//
// For each row i of a chunk of fp32 logits (s = student row, t = teacher row, T = temperature):
//   kl_i   = T^2 * sum_v p_t (log p_t - log p_s^T),  p_t = softmax(t/T), p_s^T = softmax(s/T)
//            (reported whenever a teacher is given, 0 otherwise)
//   ce_i   = -log softmax(s)[target_i]            (0 where target_i == -100)
//   loss_i = kl_coef_i * kl_term_i + ce_coef_i * ce_term_i, where a term with a NEGATIVE coefficient
//            (a maximised term) is capped at its bound: kl_term = min(kl, kl_bound). Past the cap the
//            term is constant, so its gradient is zero ("active" = coef >= 0 or term < bound).
//   grad_i = d loss_i / d s_i = kl_coef*[kl active]*T*(softmax(s/T) - p_t)
//                             + ce_coef*[ce active]*(softmax(s) - onehot(target_i))
//   kl_weight_i = kl_coef_i, or 0 where the sharpening guard (when on) drops the row's KL term: a
//            maximised KL term (kl_coef < 0) of a row with a target whose student is more confident
//            in the target than the teacher, log softmax(s/T)[target] > log softmax(t/T)[target].
//            The loss counts the KL term with kl_weight; the guard needs no extra pass (pass 1
//            already has both log-sum-exps at T).
// unlearn_fast/ops/loss_head.py::loss_rows_reference is the same contract in PyTorch.
//
// One row is two passes over memory:
//   1. statistics: row maxima and the sums of exponentials, online over tiles of kTile columns (the
//      running sums are rescaled when a tile raises the maximum; each tile is summed in float SIMD
//      lanes and added to double accumulators). The KL needs no extra pass:
//        kl = T * E_pt[t - s] + T^2 * (lse(s/T) - lse(t/T)),
//      and E_pt[t - s] = sum_v e_t (t - s) / sum_v e_t is accumulated alongside sum_v e_t.
//   2. the gradient row, written once.
// Rows are spread over threads with at::parallel_for (OpenMP). The exponential is a branch-free
// polynomial so the column loops vectorise; on x86-64 the row function is compiled for AVX-512, AVX2
// and the baseline, picked at load time (GCC/Clang target_clones).
//
// When student == teacher bit for bit, kl and the KL gradient come out exactly 0 (EUL starts there).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace unlearn_fast {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace {

constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kTile = 1024;  // columns per tile of pass 1: 4 KiB per operand, stays in L1

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__INTEL_COMPILER)
#define UNLEARN_FAST_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define UNLEARN_FAST_ROW_CLONES
#endif
// The helpers must be inlined into each clone of process_row to be compiled for its instruction set.

using cpu::vexp;

struct RowStats {
  double lse_s;   // log-sum-exp of s            (valid when has_ce or T == 1)
  double lse_sT;  // log-sum-exp of s/T          (valid when there is a teacher)
  double lse_t;   // log-sum-exp of t/T          (valid when there is a teacher)
  float m_s, m_t;            // row maxima of s and t
  float log_z1, log_zT, log_zt;  // log of the sums of exp relative to the maxima
  double e_t_diff;           // E_{p_t}[t - s]
};

// Pass 1 over one row. kTeacher: t is given. kTempOne: T == 1 (then the sums at T and at 1 coincide).
// kZ1: the sum of exp(s - m_s) at temperature 1 is needed (CE, or T == 1 with a teacher).
template <bool kTeacher, bool kTempOne, bool kZ1>
UNLEARN_FAST_INLINE RowStats row_stats(const float* s, const float* t, int64_t V, float T) {
  const float invT = 1.0f / T;
  float m_s = -std::numeric_limits<float>::infinity();
  float m_t = -std::numeric_limits<float>::infinity();
  double z1 = 0.0, zT = 0.0, zt = 0.0, a = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += kTile) {
    const int64_t len = std::min(kTile, V - j0);
    const float* sp = s + j0;
    const float* tp = kTeacher ? t + j0 : nullptr;
    float tile_ms = -std::numeric_limits<float>::infinity();
    float tile_mt = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : tile_ms, tile_mt)
    for (int64_t i = 0; i < len; ++i) {
      tile_ms = sp[i] > tile_ms ? sp[i] : tile_ms;
      if constexpr (kTeacher) tile_mt = tp[i] > tile_mt ? tp[i] : tile_mt;
    }
    if (tile_ms > m_s) {  // rescale the running sums to the new maximum
      const double d = static_cast<double>(m_s) - static_cast<double>(tile_ms);
      z1 *= std::exp(d);
      zT *= std::exp(d / T);
      m_s = tile_ms;
    }
    if constexpr (kTeacher) {
      if (tile_mt > m_t) {
        const double f = std::exp((static_cast<double>(m_t) - static_cast<double>(tile_mt)) / T);
        zt *= f;
        a *= f;
        m_t = tile_mt;
      }
    }
    const float ms = m_s, mt = m_t;
    float z1_tile = 0.f, zT_tile = 0.f, zt_tile = 0.f, a_tile = 0.f;
#pragma omp simd reduction(+ : z1_tile, zT_tile, zt_tile, a_tile)
    for (int64_t i = 0; i < len; ++i) {
      const float ds = sp[i] - ms;
      if constexpr (kZ1) z1_tile += vexp(ds);
      if constexpr (kTeacher) {
        if constexpr (!kTempOne) zT_tile += vexp(ds * invT);
        const float et = vexp((tp[i] - mt) * invT);
        zt_tile += et;
        a_tile += et * (tp[i] - sp[i]);
      }
    }
    z1 += z1_tile;
    zT += zT_tile;
    zt += zt_tile;
    a += a_tile;
  }
  if constexpr (kTempOne) zT = z1;
  RowStats st{};
  st.m_s = m_s;
  st.m_t = m_t;
  st.log_z1 = static_cast<float>(std::log(z1));
  st.log_zT = static_cast<float>(std::log(zT));
  st.log_zt = static_cast<float>(std::log(zt));
  st.lse_s = m_s + std::log(z1);
  st.lse_sT = m_s / static_cast<double>(T) + std::log(zT);
  st.lse_t = m_t / static_cast<double>(T) + std::log(zt);
  st.e_t_diff = a / zt;
  return st;
}

// Pass 2: g = a_coef * (softmax(s/T) - softmax(t/T)) + c_coef * softmax(s); the one-hot part of the
// CE gradient is subtracted by the caller.
template <bool kKL, bool kCE, bool kTempOne>
UNLEARN_FAST_INLINE void row_grad(const float* s, const float* t, int64_t V, float T, const RowStats& st,
                     float a_coef, float c_coef, float* g) {
  const float invT = 1.0f / T;
  const float ms = st.m_s, mt = st.m_t;
  const float lz1 = st.log_z1, lzT = st.log_zT, lzt = st.log_zt;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float ds = s[j] - ms;
    float v = 0.f;
    if constexpr (kKL) {
      const float pt = vexp((t[j] - mt) * invT - lzt);
      if constexpr (kTempOne) {
        const float ps = vexp(ds - lz1);
        // (ps - pt) first: exactly 0 where student == teacher, whatever FMA contraction does
        v = a_coef * (ps - pt) + c_coef * ps;  // c_coef is 0 when there is no CE gradient
      } else {
        const float psT = vexp(ds * invT - lzT);
        v = a_coef * (psT - pt);
        if constexpr (kCE) v += c_coef * vexp(ds - lz1);
      }
    } else if constexpr (kCE) {
      v = c_coef * vexp(ds - lz1);
    }
    g[j] = v;
  }
}

struct RowOut {
  float kl, ce, kl_weight;
};

UNLEARN_FAST_ROW_CLONES
RowOut process_row(const float* s, const float* t, int64_t V, int64_t target, float kl_coef,
                   float ce_coef, float kl_bound, float ce_bound, float T, bool guard, float* g) {
  const bool teacher = t != nullptr;
  const bool has_ce = target != kIgnoreIndex;
  const bool temp_one = T == 1.0f;
  if (!teacher && !has_ce) {
    std::memset(g, 0, sizeof(float) * V);
    return {0.f, 0.f, kl_coef};
  }
  RowStats st;
  if (!teacher) {
    st = row_stats<false, true, true>(s, t, V, T);
  } else if (temp_one) {
    st = row_stats<true, true, true>(s, t, V, T);
  } else if (has_ce) {
    st = row_stats<true, false, true>(s, t, V, T);
  } else {
    st = row_stats<true, false, false>(s, t, V, T);
  }
  const double Td = T;
  const float kl = teacher ? static_cast<float>(Td * st.e_t_diff + Td * Td * (st.lse_sT - st.lse_t)) : 0.f;
  const float ce = has_ce ? static_cast<float>(st.lse_s - static_cast<double>(s[target])) : 0.f;
  float kl_weight = kl_coef;
  if (guard && teacher && has_ce && kl_coef < 0.f) {
    const double lp_s = s[target] / Td - st.lse_sT, lp_t = t[target] / Td - st.lse_t;
    if (lp_s > lp_t) kl_weight = 0.f;
  }

  const bool kl_active = teacher && kl_weight != 0.f && (kl_weight >= 0.f || kl < kl_bound);
  const bool ce_active = has_ce && ce_coef != 0.f && (ce_coef >= 0.f || ce < ce_bound);
  const float a_coef = kl_active ? kl_weight * T : 0.f;
  const float c_coef = ce_active ? ce_coef : 0.f;
  if (kl_active && temp_one) {
    row_grad<true, true, true>(s, t, V, T, st, a_coef, c_coef, g);
  } else if (kl_active && ce_active) {
    row_grad<true, true, false>(s, t, V, T, st, a_coef, c_coef, g);
  } else if (kl_active) {
    row_grad<true, false, false>(s, t, V, T, st, a_coef, c_coef, g);
  } else if (ce_active) {
    row_grad<false, true, false>(s, t, V, T, st, a_coef, c_coef, g);
  } else {
    std::memset(g, 0, sizeof(float) * V);
  }
  if (ce_active) g[target] -= c_coef;
  return {kl, ce, kl_weight};
}

void check_vector(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t n,
                  c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, "unlearn_fast.loss_rows: ", name, " must be on ", device,
              " like student_logits, got ", x.device());
  TORCH_CHECK(x.scalar_type() == dtype, "unlearn_fast.loss_rows: ", name, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "unlearn_fast.loss_rows: ", name, " must have shape [", n,
              "] (one per row of student_logits), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "unlearn_fast.loss_rows: ", name, " must be contiguous");
}

}  // namespace

// Shared by the CPU and CUDA entry points: shapes, dtypes, devices and contiguity.
void check_loss_rows_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                          const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                          double temperature, c10::DeviceType device) {
  TORCH_CHECK(student_logits.device().type() == device, "unlearn_fast.loss_rows: this kernel runs on ",
              device, " tensors, but student_logits is on ", student_logits.device());
  TORCH_CHECK(student_logits.scalar_type() == at::kFloat,
              "unlearn_fast.loss_rows: student_logits must be float32, got ", student_logits.scalar_type());
  TORCH_CHECK(student_logits.dim() == 2, "unlearn_fast.loss_rows: student_logits must be 2-D [n, V], got shape ",
              student_logits.sizes());
  TORCH_CHECK(student_logits.size(1) > 0, "unlearn_fast.loss_rows: the vocabulary dimension is empty");
  TORCH_CHECK(student_logits.is_contiguous(), "unlearn_fast.loss_rows: student_logits must be contiguous");
  if (teacher_logits.numel() != 0) {
    TORCH_CHECK(teacher_logits.device() == student_logits.device(),
                "unlearn_fast.loss_rows: teacher_logits must be on ", student_logits.device(), ", got ",
                teacher_logits.device());
    TORCH_CHECK(teacher_logits.scalar_type() == at::kFloat,
                "unlearn_fast.loss_rows: teacher_logits must be float32 (or an empty tensor for no KL term), got ",
                teacher_logits.scalar_type());
    TORCH_CHECK(teacher_logits.sizes() == student_logits.sizes(),
                "unlearn_fast.loss_rows: teacher_logits must have the shape of student_logits ",
                student_logits.sizes(), " (or be empty for no KL term), got ", teacher_logits.sizes());
    TORCH_CHECK(teacher_logits.is_contiguous(), "unlearn_fast.loss_rows: teacher_logits must be contiguous");
  }
  const int64_t n = student_logits.size(0);
  check_vector(targets, "targets", at::kLong, n, device);
  check_vector(kl_coef, "kl_coef", at::kFloat, n, device);
  check_vector(ce_coef, "ce_coef", at::kFloat, n, device);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "unlearn_fast.loss_rows: temperature must be a positive finite number, got ", temperature);
}

namespace {

// The CPU kernel proper; grad [n, V] may be student_logits itself (each row is read in pass 1 and
// each element read before it is overwritten in pass 2). Returns (kl, ce, kl_weight).
Tensor3 loss_rows_cpu_into(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
    double temperature, bool sharpening_guard, at::Tensor& grad) {
  check_loss_rows_args(student_logits, teacher_logits, targets, kl_coef, ce_coef, temperature,
                       c10::DeviceType::CPU);
  const int64_t n = student_logits.size(0);
  const int64_t V = student_logits.size(1);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tgt[i] == kIgnoreIndex || (tgt[i] >= 0 && tgt[i] < V), "unlearn_fast.loss_rows: targets[", i,
                "] = ", tgt[i], " is outside [0, ", V, ") and is not the ignore index ", kIgnoreIndex);
  }
  at::Tensor kl = at::empty({n}, student_logits.options());
  at::Tensor ce = at::empty({n}, student_logits.options());
  at::Tensor kl_weight = at::empty({n}, student_logits.options());

  const float* s = student_logits.data_ptr<float>();
  const float* t = teacher_logits.numel() ? teacher_logits.data_ptr<float>() : nullptr;
  const float* klc = kl_coef.data_ptr<float>();
  const float* cec = ce_coef.data_ptr<float>();
  float* kl_out = kl.data_ptr<float>();
  float* ce_out = ce.data_ptr<float>();
  float* klw_out = kl_weight.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  const float T = static_cast<float>(temperature);
  const float klb = static_cast<float>(kl_bound), ceb = static_cast<float>(ce_bound);
  const int64_t grain = std::max<int64_t>(1, 16384 / V);  // rows per task: small vocabularies batch rows
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowOut r = process_row(s + i * V, t ? t + i * V : nullptr, V, tgt[i], klc[i], cec[i], klb, ceb, T,
                                   sharpening_guard, g + i * V);
      kl_out[i] = r.kl;
      ce_out[i] = r.ce;
      klw_out[i] = r.kl_weight;
    }
  });
  return {kl, ce, kl_weight};
}

}  // namespace

Tensor4 loss_rows_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
    double temperature, bool sharpening_guard) {
  at::Tensor grad = at::empty_like(student_logits, at::MemoryFormat::Contiguous);
  auto [kl, ce, kl_weight] = loss_rows_cpu_into(student_logits, teacher_logits, targets, kl_coef, ce_coef,
                                                kl_bound, ce_bound, temperature, sharpening_guard, grad);
  return {kl, ce, grad, kl_weight};
}

// The same, with the gradient written over student_logits: saves a [n, V] buffer (and its page
// faults) per chunk of the loss head. Returns (kl, ce, kl_weight).
Tensor3 loss_rows_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
    double temperature, bool sharpening_guard) {
  return loss_rows_cpu_into(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                            temperature, sharpening_guard, student_logits);
}

// Shapes only, for torch.compile / FakeTensor / torch.library.opcheck (registered for the Meta key).
Tensor4 loss_rows_meta(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
    const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
    double temperature, bool sharpening_guard) {
  TORCH_CHECK(student_logits.dim() == 2, "unlearn_fast.loss_rows: student_logits must be 2-D [n, V], got shape ",
              student_logits.sizes());
  const int64_t n = student_logits.size(0);
  return {at::empty({n}, student_logits.options()), at::empty({n}, student_logits.options()),
          at::empty_like(student_logits, at::MemoryFormat::Contiguous), at::empty({n}, student_logits.options())};
}

}  // namespace unlearn_fast

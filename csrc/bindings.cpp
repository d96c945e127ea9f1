// The one bindings file of unlearn_fast._C. Every op is registered twice:
//   * as a pybind11 function, unlearn_fast._C.<op> (routes CPU / CUDA tensors itself), and
//   * as a torch custom op, torch.ops.unlearn_fast.<op>, with CPU, CUDA and Meta kernels, so
//     torch.library.opcheck can test it and torch.compile can trace it.
// The kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; their declarations are below.

#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/block_gemm.h"

namespace unlearn_fast {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// csrc/cpu/loss_rows.cpp
Tensor4 loss_rows_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                      const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                      double kl_bound, double ce_bound, double temperature, bool sharpening_guard);
Tensor4 loss_rows_meta(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                       const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                       double kl_bound, double ce_bound, double temperature, bool sharpening_guard);
Tensor3 loss_rows_inplace_cpu(at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                              double kl_bound, double ce_bound, double temperature, bool sharpening_guard);
#ifdef UNLEARN_FAST_WITH_CUDA
// csrc/cuda/loss_rows.cu
Tensor4 loss_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                       const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                       double kl_bound, double ce_bound, double temperature, bool sharpening_guard);
#endif

// csrc/cpu/unlearning_layer.cpp
std::tuple<at::Tensor, at::Tensor> unlearning_layer_forward_cpu(const at::Tensor& x, const at::Tensor& down_weight,
                                                                const at::Tensor& down_bias,
                                                                const at::Tensor& up_weight,
                                                                const at::Tensor& up_bias,
                                                                c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> unlearning_layer_forward_meta(const at::Tensor& x, const at::Tensor& down_weight,
                                                                 const at::Tensor& down_bias,
                                                                 const at::Tensor& up_weight,
                                                                 const at::Tensor& up_bias,
                                                                 c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearning_layer_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& down_weight,
    const at::Tensor& up_weight, c10::string_view activation, bool compute_grad_x);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unlearning_layer_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& down_weight,
    const at::Tensor& up_weight, c10::string_view activation, bool compute_grad_x);

// csrc/cpu/trunk.cpp
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_forward_meta(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& rstd);
at::Tensor rms_norm_backward_meta(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& rstd);
at::Tensor swiglu_forward_cpu(const at::Tensor& gate, const at::Tensor& up);
at::Tensor swiglu_forward_meta(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_h, const at::Tensor& gate,
                                                       const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor& grad_h, const at::Tensor& gate,
                                                        const at::Tensor& up);

namespace {

Tensor4 loss_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
                  const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
                  double temperature, bool sharpening_guard) {
  if (student_logits.is_cuda()) {
#ifdef UNLEARN_FAST_WITH_CUDA
    return loss_rows_cuda(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                          temperature, sharpening_guard);
#else
    TORCH_CHECK(false, "unlearn_fast._C was built without CUDA kernels (torch without CUDA, or no nvcc at "
                       "build time); loss_rows got CUDA tensors");
#endif
  }
  return loss_rows_cpu(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                       temperature, sharpening_guard);
}

constexpr const char* kLossRowsDoc = R"doc(loss_rows(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature, sharpening_guard=False) -> (kl, ce, grad_logits, kl_weight)

Per-row KL(teacher||student) at temperature T (times T^2), cross-entropy at T = 1, and the gradient
of sum_i kl_weight_i*kl_term_i + ce_coef_i*ce_term_i with respect to the student logits, for one
chunk of float32 logits [n, V]. teacher_logits with numel() == 0 means no KL term; targets == -100
means no CE for that row. A term with a negative coefficient is capped at its bound (kl_bound /
ce_bound) and has no gradient once the cap is reached. kl_weight is kl_coef, or 0 where the
sharpening guard (when on) drops a maximised KL term because the student is more confident in the
row's target than the teacher. Contract: unlearn_fast.ops.loss_head.loss_rows_reference.)doc";

constexpr const char* kUnlearningLayerForwardDoc = R"doc(unlearning_layer_forward(x, down_weight, down_bias, up_weight, up_bias, activation) -> (y, pre)

K unlearning layers summed on the residual, CPU: y = x + c + act(x D^T + b) U^T, with the K layers
concatenated (D [R, d], b [R], U [d, R], c = sum of the up biases [d]; float32) and one activation
(relu, gelu, silu). x [N, d] is float32, bfloat16 or float16; y has x's dtype; pre = x D^T + b is
float32 [N, R], saved for backward. Contract: unlearn_fast.ops.unlearning_layer.unlearning_layer_reference.)doc";

constexpr const char* kUnlearningLayerBackwardDoc = R"doc(unlearning_layer_backward(grad_y, x, pre, down_weight, up_weight, activation, compute_grad_x) -> (grad_x, grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias)

Gradients of unlearning_layer_forward for the concatenated layers (float32, grad_x in x's dtype;
grad_x is an empty tensor when compute_grad_x is false).)doc";

}  // namespace
}  // namespace unlearn_fast

TORCH_LIBRARY(unlearn_fast, m) {
  m.def(
      "loss_rows(Tensor student_logits, Tensor teacher_logits, Tensor targets, Tensor kl_coef, "
      "Tensor ce_coef, float kl_bound, float ce_bound, float temperature, bool sharpening_guard=False) "
      "-> (Tensor kl, Tensor ce, Tensor grad_logits, Tensor kl_weight)");
  m.def(
      "unlearning_layer_forward(Tensor x, Tensor down_weight, Tensor down_bias, Tensor up_weight, "
      "Tensor up_bias, str activation) -> (Tensor y, Tensor pre)");
  m.def(
      "unlearning_layer_backward(Tensor grad_y, Tensor x, Tensor pre, Tensor down_weight, Tensor up_weight, "
      "str activation, bool compute_grad_x) -> (Tensor grad_x, Tensor grad_down_weight, Tensor grad_down_bias, "
      "Tensor grad_up_weight, Tensor grad_up_bias)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> Tensor");
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_h, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
}

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("loss_rows", &unlearn_fast::loss_rows_cpu);
  m.impl("unlearning_layer_forward", &unlearn_fast::unlearning_layer_forward_cpu);
  m.impl("unlearning_layer_backward", &unlearn_fast::unlearning_layer_backward_cpu);
  m.impl("rms_norm_forward", &unlearn_fast::rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &unlearn_fast::rms_norm_backward_cpu);
  m.impl("swiglu_forward", &unlearn_fast::swiglu_forward_cpu);
  m.impl("swiglu_backward", &unlearn_fast::swiglu_backward_cpu);
}

TORCH_LIBRARY_IMPL(unlearn_fast, Meta, m) {
  m.impl("loss_rows", &unlearn_fast::loss_rows_meta);
  m.impl("unlearning_layer_forward", &unlearn_fast::unlearning_layer_forward_meta);
  m.impl("unlearning_layer_backward", &unlearn_fast::unlearning_layer_backward_meta);
  m.impl("rms_norm_forward", &unlearn_fast::rms_norm_forward_meta);
  m.impl("rms_norm_backward", &unlearn_fast::rms_norm_backward_meta);
  m.impl("swiglu_forward", &unlearn_fast::swiglu_forward_meta);
  m.impl("swiglu_backward", &unlearn_fast::swiglu_backward_meta);
}

#ifdef UNLEARN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(unlearn_fast, CUDA, m) {
  m.impl("loss_rows", &unlearn_fast::loss_rows_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "unlearn_fast C++/CUDA kernels (also registered as torch.ops.unlearn_fast.*)";
  // Failed TORCH_CHECKs reach Python as RuntimeError (ValueError / TypeError for TORCH_CHECK_VALUE /
  // TORCH_CHECK_TYPE) with the message only, as torch's own bindings do, not the C++ backtrace.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
#ifdef UNLEARN_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("loss_rows", &unlearn_fast::loss_rows, py::arg("student_logits"), py::arg("teacher_logits"),
        py::arg("targets"), py::arg("kl_coef"), py::arg("ce_coef"), py::arg("kl_bound"), py::arg("ce_bound"),
        py::arg("temperature"), py::arg("sharpening_guard") = false, py::call_guard<py::gil_scoped_release>(),
        unlearn_fast::kLossRowsDoc);
  // CPU only, pybind only (it mutates an input): the loss head's chunk loop uses it to skip a buffer.
  m.def("loss_rows_inplace", &unlearn_fast::loss_rows_inplace_cpu, py::arg("student_logits"),
        py::arg("teacher_logits"), py::arg("targets"), py::arg("kl_coef"), py::arg("ce_coef"), py::arg("kl_bound"),
        py::arg("ce_bound"), py::arg("temperature"), py::arg("sharpening_guard") = false,
        py::call_guard<py::gil_scoped_release>(),
        "loss_rows on CPU tensors with the gradient written over student_logits; returns (kl, ce, kl_weight).");
  m.def("unlearning_layer_forward", &unlearn_fast::unlearning_layer_forward_cpu, py::arg("x"),
        py::arg("down_weight"), py::arg("down_bias"), py::arg("up_weight"), py::arg("up_bias"),
        py::arg("activation"), py::call_guard<py::gil_scoped_release>(), unlearn_fast::kUnlearningLayerForwardDoc);
  m.def("unlearning_layer_backward", &unlearn_fast::unlearning_layer_backward_cpu, py::arg("grad_y"), py::arg("x"),
        py::arg("pre"), py::arg("down_weight"), py::arg("up_weight"), py::arg("activation"),
        py::arg("compute_grad_x"), py::call_guard<py::gil_scoped_release>(),
        unlearn_fast::kUnlearningLayerBackwardDoc);
  m.def(
      "cpu_gemm_kernel", [] { return unlearn_fast::cpu::gemm_kernel_name(unlearn_fast::cpu::pick_gemm_kernel()); },
      "The block GEMM kernel the CPU unlearning-layer op would use now: 'avx512', 'avx2' or 'aten' (the fastest "
      "one this CPU has, or the one UNLEARN_FAST_CPU_GEMM asks for where the CPU has it).");
}

// The one bindings file of unlearn_fast._C. Every op is registered twice:
//   * as a pybind11 function, unlearn_fast._C.<op> (routes CPU / CUDA tensors itself), and
//   * as a torch custom op, torch.ops.unlearn_fast.<op>, with CPU, CUDA and Meta kernels, so
//     torch.library.opcheck can test it and torch.compile can trace it.
// The kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; their declarations are below.

#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <tuple>

namespace unlearn_fast {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// csrc/cpu/loss_rows.cpp
Tensor3 loss_rows_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                      const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                      double kl_bound, double ce_bound, double temperature);
Tensor3 loss_rows_meta(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                       const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                       double kl_bound, double ce_bound, double temperature);
#ifdef UNLEARN_FAST_WITH_CUDA
// csrc/cuda/loss_rows.cu
Tensor3 loss_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                       const at::Tensor& targets, const at::Tensor& kl_coef, const at::Tensor& ce_coef,
                       double kl_bound, double ce_bound, double temperature);
#endif

namespace {

Tensor3 loss_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& targets,
                  const at::Tensor& kl_coef, const at::Tensor& ce_coef, double kl_bound, double ce_bound,
                  double temperature) {
  if (student_logits.is_cuda()) {
#ifdef UNLEARN_FAST_WITH_CUDA
    return loss_rows_cuda(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                          temperature);
#else
    TORCH_CHECK(false, "unlearn_fast._C was built without CUDA kernels (torch without CUDA, or no nvcc at "
                       "build time); loss_rows got CUDA tensors");
#endif
  }
  return loss_rows_cpu(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound,
                       temperature);
}

constexpr const char* kLossRowsDoc = R"doc(loss_rows(student_logits, teacher_logits, targets, kl_coef, ce_coef, kl_bound, ce_bound, temperature) -> (kl, ce, grad_logits)

Per-row KL(teacher||student) at temperature T (times T^2), cross-entropy at T = 1, and the gradient
of sum_i kl_coef_i*kl_term_i + ce_coef_i*ce_term_i with respect to the student logits, for one chunk
of float32 logits [n, V]. teacher_logits with numel() == 0 means no KL term; targets == -100 means no
CE for that row. A term with a negative coefficient is capped at its bound (kl_bound / ce_bound) and
has no gradient once the cap is reached. Contract: unlearn_fast.ops.loss_head.loss_rows_reference.)doc";

}  // namespace
}  // namespace unlearn_fast

TORCH_LIBRARY(unlearn_fast, m) {
  m.def(
      "loss_rows(Tensor student_logits, Tensor teacher_logits, Tensor targets, Tensor kl_coef, "
      "Tensor ce_coef, float kl_bound, float ce_bound, float temperature) "
      "-> (Tensor kl, Tensor ce, Tensor grad_logits)");
}

TORCH_LIBRARY_IMPL(unlearn_fast, CPU, m) {
  m.impl("loss_rows", &unlearn_fast::loss_rows_cpu);
}

TORCH_LIBRARY_IMPL(unlearn_fast, Meta, m) {
  m.impl("loss_rows", &unlearn_fast::loss_rows_meta);
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
        py::arg("temperature"), py::call_guard<py::gil_scoped_release>(), unlearn_fast::kLossRowsDoc);
}

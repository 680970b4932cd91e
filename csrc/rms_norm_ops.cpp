// The API layer of RMSNorm in kernels._C: declares the ops (a TORCH_LIBRARY_FRAGMENT of llm_kernels,
// beside ops.cpp's), validates every input with TORCH_CHECK (naming the tensor and printing its shape,
// dtype and device), and registers the CPU kernels (rms_norm_cpu.cpp) and the CUDA kernels
// (rms_norm_cuda.cu, CUDA build only, through rms_norm_cuda_kernels()).
//
// Python side: kernels/_cuda_rmsnorm.py registers the fake (meta) implementations and the autograd
// formulas with torch.library, and the "cuda" backend's rms_norm / add_rms_norm.
//
// Ops (torch.ops.llm_kernels.*), on x of shape (..., C), normalized over its last dim (M rows: the
// product of the leading dims); weight (C,) in x's dtype or float32:
//   rms_norm_fwd(x, weight, eps) -> (y, rstd)
//       y like x (contiguous) in x's dtype; rstd (...) = 1/sqrt(mean(x^2) + eps) per row, in float32
//       (float64 for float64 x).
//   add_rms_norm_fwd(x, residual, weight, eps) -> (y, sum, rstd)
//       sum = x + residual formed in fp32 and stored in x's dtype, y = rms_norm(sum), rstd sum's.
//   rms_norm_bwd(dy, x, weight, rstd, dsum) -> (dx, dweight)
//       dx like x in x's dtype, plus dsum when given (add_rms_norm's backward: x is the saved sum and
//       dsum the sum's own incoming gradient, so dx is the gradient of both x and residual);
//       dweight (C,) in weight's dtype (accumulated in fp32/fp64).
// Unlike the 2-D LayerNorm ops, x keeps its shape: the Python wrapper then needs no reshape views in
// front of the op, whose backward nodes would hand x and residual two views of one gradient buffer
// (two leaves' .grad aliasing one storage).  Inputs may be non-contiguous (made contiguous here).
// On CUDA: float32, float16, bfloat16.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "rms_norm.h"

namespace llm_kernels {

RmsNormCudaKernels& rms_norm_cuda_kernels() {
  static RmsNormCudaKernels table;
  return table;
}

namespace {

std::string describe(const at::Tensor& t) {
  return c10::str("shape ", t.sizes(), ", dtype ", t.scalar_type(), ", device ", t.device());
}

void check_x(const char* op, const at::Tensor& x) {
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", describe(x));
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must be (..., C) with C > 0, got ", describe(x));
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, op, ": weight must have shape [", C,
              "] to match x's last dim, got ", describe(weight));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have x's dtype ", x.scalar_type(), " or float32, got ", describe(weight));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(), ", got ",
              describe(weight));
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ",
              name, " must match x (", describe(x), "), got ", describe(t));
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite positive number, got ", eps);
}

void check_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm_fwd";
  check_x(op, x);
  check_weight(op, weight, x);
  check_eps(op, eps);
}

void check_add_fwd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm_fwd";
  check_x(op, x);
  check_like_x(op, "residual", residual, x);
  check_weight(op, weight, x);
  check_eps(op, eps);
}

// The optional dsum as a contiguous tensor, undefined when absent.
at::Tensor check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& dsum) {
  const char* op = "rms_norm_bwd";
  check_x(op, x);
  check_like_x(op, "dy", dy, x);
  check_weight(op, weight, x);
  const auto sd = stats_dtype(x.scalar_type());
  const auto rows = x.sizes().slice(0, x.dim() - 1);  // x's leading dims
  TORCH_CHECK(rstd.sizes() == rows && rstd.scalar_type() == sd && rstd.device() == x.device(), op,
              ": rstd must have shape ", rows, ", dtype ", sd, " and device ", x.device(),
              " (as rms_norm_fwd returns it), got ", describe(rstd));
  if (!dsum.has_value() || !dsum->defined()) return at::Tensor();
  check_like_x(op, "dsum", *dsum, x);
  return dsum->contiguous();
}

constexpr const char* kNoCuda =
    "kernels._C was built without its CUDA kernels (CPU-only build: no GPU visible at build time, "
    "LLM_SKIP_CUDA_BUILD=1, a CPU-only torch or no CUDA toolkit); rebuild with `pip install -e . "
    "--no-build-isolation --no-deps` on a machine with nvcc and this GPU (or TORCH_CUDA_ARCH_LIST set)";

RmsNormFwdOut fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fwd(x, weight, eps);
  return rms_norm_fwd_cpu(x.contiguous(), weight.contiguous(), eps);
}

AddRmsNormFwdOut add_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_add_fwd(x, residual, weight, eps);
  return add_rms_norm_fwd_cpu(x.contiguous(), residual.contiguous(), weight.contiguous(), eps);
}

RmsNormBwdOut bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                      const std::optional<at::Tensor>& dsum) {
  const at::Tensor ds = check_bwd(dy, x, weight, rstd, dsum);
  return rms_norm_bwd_cpu(dy.contiguous(), x.contiguous(), weight.contiguous(), rstd.contiguous(), ds);
}

RmsNormFwdOut fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_fwd(x, weight, eps);
  TORCH_CHECK(rms_norm_cuda_kernels().fwd != nullptr, "rms_norm_fwd: ", kNoCuda);
  return rms_norm_cuda_kernels().fwd(x.contiguous(), weight.contiguous(), eps);
}

AddRmsNormFwdOut add_fwd_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                              double eps) {
  check_add_fwd(x, residual, weight, eps);
  TORCH_CHECK(rms_norm_cuda_kernels().add_fwd != nullptr, "add_rms_norm_fwd: ", kNoCuda);
  return rms_norm_cuda_kernels().add_fwd(x.contiguous(), residual.contiguous(), weight.contiguous(), eps);
}

RmsNormBwdOut bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                       const std::optional<at::Tensor>& dsum) {
  const at::Tensor ds = check_bwd(dy, x, weight, rstd, dsum);
  TORCH_CHECK(rms_norm_cuda_kernels().bwd != nullptr, "rms_norm_bwd: ", kNoCuda);
  return rms_norm_cuda_kernels().bwd(dy.contiguous(), x.contiguous(), weight.contiguous(), rstd.contiguous(), ds);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_kernels, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor y, Tensor sum, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dsum) -> (Tensor dx, Tensor dweight)");
}

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("rms_norm_fwd", &fwd_cpu);
  m.impl("add_rms_norm_fwd", &add_fwd_cpu);
  m.impl("rms_norm_bwd", &bwd_cpu);
}

TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("rms_norm_fwd", &fwd_cuda);
  m.impl("add_rms_norm_fwd", &add_fwd_cuda);
  m.impl("rms_norm_bwd", &bwd_cuda);
}

}  // namespace llm_kernels

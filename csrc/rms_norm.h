// RMSNorm and residual-add + RMSNorm in kernels._C: what rms_norm_ops.cpp (their API layer) calls.
//
// rms_norm_ops.cpp validates every input once (TORCH_CHECK naming the tensor, its shape, dtype and
// device) and calls these on contiguous tensors: x, residual, dy, dsum (..., C) in one dtype, read as
// M = numel / C rows; weight (C,) in x's dtype or float32 (fp32 parameters with 16-bit activations are
// read as they are); rstd (...) (x's leading dims) in float32 (float64 for float64 x).  A dsum that is not defined means "none".  As for the other
// ops (common.h), the CUDA kernels are in a translation unit compiled only in the CUDA build, reached
// through a table that rms_norm_cuda.cu fills when the library loads; in a CPU-only build it stays
// empty and CUDA calls fail saying so.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace llm_kernels {

using RmsNormFwdOut = std::tuple<at::Tensor, at::Tensor>;               // y, rstd
using AddRmsNormFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // y, sum, rstd
using RmsNormBwdOut = std::tuple<at::Tensor, at::Tensor>;               // dx (+ dsum), dweight

// csrc/rms_norm_cpu.cpp
RmsNormFwdOut rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
AddRmsNormFwdOut add_rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                      double eps);
RmsNormBwdOut rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& rstd, const at::Tensor& dsum);

// csrc/rms_norm_cuda.cu (CUDA build only), reached through this table.
struct RmsNormCudaKernels {
  RmsNormFwdOut (*fwd)(const at::Tensor&, const at::Tensor&, double) = nullptr;
  AddRmsNormFwdOut (*add_fwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) = nullptr;
  RmsNormBwdOut (*bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&) = nullptr;
};
RmsNormCudaKernels& rms_norm_cuda_kernels();  // defined in rms_norm_ops.cpp

}  // namespace llm_kernels

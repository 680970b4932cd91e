// Shared declarations of the kernels._C extension: what ops.cpp (the API layer) calls.
//
// ops.cpp validates every input once (TORCH_CHECK naming the tensor, its shape, dtype and device) and
// then calls these on 2-D contiguous tensors: x, dy (M, C); weight, bias (C,) in x's dtype; mean and
// rstd (M,) in float32 (float64 for float64 x).  The CUDA kernels live in a separate translation unit
// that is compiled only in the CUDA build, so ops.cpp reaches them through a table the .cu file fills
// at load time; in a CPU-only build the table stays empty and CUDA calls fail with a clear message.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace llm_kernels {

using LayerNormFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // y, mean, rstd
using LayerNormBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // dx, dweight, dbias

// csrc/layernorm_cpu.cpp
LayerNormFwdOut layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
LayerNormBwdOut layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& rstd);

// ---- causal attention (csrc/attention_cpu.cpp, csrc/attention_cuda.cu + attention_bwd_cuda.cu) ----
// q (B, H, Tq, D), k, v (B, H, Tk, D), contiguous, Tq <= Tk, bottom-right causal mask.
using AttentionFwdOut = std::tuple<at::Tensor, at::Tensor>;              // out (B, H, Tq, D), lse (B, H, Tq)
using AttentionBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv
AttentionFwdOut attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
AttentionBwdOut attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale);
// The head dims the CUDA attention kernels are instantiated for (the CPU kernels take any D >= 1).
inline bool attention_cuda_supports_head_dim(int64_t D) { return D == 64 || D == 128; }
// ---- end causal attention ----

// csrc/layernorm_cuda.cu (only in the CUDA build), reached through this table.
struct CudaKernels {
  LayerNormFwdOut (*layer_norm_fwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) = nullptr;
  LayerNormBwdOut (*layer_norm_bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&) = nullptr;
  // ---- causal attention (csrc/attention_cuda.cu fills both) ----
  AttentionFwdOut (*attention_fwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) = nullptr;
  AttentionBwdOut (*attention_bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, double) = nullptr;
  // ---- end causal attention ----
};
CudaKernels& cuda_kernels();  // defined in ops.cpp

// The dtype of the saved statistics: float64 for float64 inputs, float32 for everything narrower.
inline at::ScalarType stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace llm_kernels

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

// ---- add_layer_norm and cross-entropy ----------------------------------------------------------
// add_layer_norm_fwd: x, residual (M, C) in one dtype; weight, bias (C,) in x's dtype.  sum = x + residual
// formed in fp32 (fp64) and rounded to x's dtype, y = LayerNorm(sum); mean, rstd are sum's statistics.
using AddLayerNormFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // y, sum, mean, rstd
// cross_entropy_fwd: logits (N, V) float, targets (N,) int64 with values in [0, V) or == ignore_index.
// loss is the 0-d mean over the non-ignored rows (0 when there are none), stats (N, 2) each row's max m
// and log(sum(exp(z - m))), kept apart; both in stats_dtype(logits).  cross_entropy_bwd: dloss a 0-d
// float tensor; returns dlogits.
using CrossEntropyFwdOut = std::tuple<at::Tensor, at::Tensor>;  // loss, stats

// csrc/layernorm_cpu.cpp
AddLayerNormFwdOut add_layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                          const at::Tensor& bias, double eps);
// csrc/cross_entropy_cpu.cpp
CrossEntropyFwdOut cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index);
at::Tensor cross_entropy_bwd_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& stats, int64_t ignore_index);
// ---- end add_layer_norm and cross-entropy --------------------------------------------------------

// ---- causal attention (csrc/attention_cpu.cpp, csrc/attention_cuda.cu + attention_bwd_cuda.cu) ----
// q (B, H, Tq, D), k, v (B, H_kv, Tk, D) with H % H_kv == 0 (query head h reads k/v head h / (H / H_kv)),
// contiguous, Tq <= Tk, bottom-right causal mask.
using AttentionFwdOut = std::tuple<at::Tensor, at::Tensor>;              // out (B, H, Tq, D), lse (B, H, Tq)
using AttentionBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv
AttentionFwdOut attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
AttentionBwdOut attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale);
// The head dims the CUDA attention kernels are instantiated for (the CPU kernels take any D >= 1).
inline bool attention_cuda_supports_head_dim(int64_t D) { return D == 64 || D == 128; }
// ---- end causal attention ----

// csrc/*_cuda.cu (only in the CUDA build), reached through this table.
struct CudaKernels {
  LayerNormFwdOut (*layer_norm_fwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) = nullptr;
  LayerNormBwdOut (*layer_norm_bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&) = nullptr;
  // ---- add_layer_norm (layernorm_cuda.cu) and cross-entropy (cross_entropy_cuda.cu) ----
  AddLayerNormFwdOut (*add_layer_norm_fwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, double) = nullptr;
  CrossEntropyFwdOut (*cross_entropy_fwd)(const at::Tensor&, const at::Tensor&, int64_t) = nullptr;
  at::Tensor (*cross_entropy_bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  int64_t) = nullptr;
  // ---- end add_layer_norm and cross-entropy ----
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

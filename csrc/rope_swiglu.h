// Declarations shared by rope_swiglu_cpu.cpp (the ops' API layer and CPU kernels) and rope_swiglu_cuda.cu.
//
// rope_swiglu_cpu.cpp validates every input (TORCH_CHECK naming the tensor, its shape, dtype and device)
// and brings it to the layout below before calling these:
//   rope: x (B, H, T, D) with a unit-stride last dim (B, H, T strides arbitrary: q and k are views of a
//         fused projection), cos and sin (T, D/2) float32 with unit-stride columns (any row stride);
//         returns y (B, H, T, D) contiguous in x's dtype, y = R(theta) x, or R(-theta) x when inverse
//         (the backward: the rotation's transpose).
//   swiglu: gate, up, dy (M, C) with unit-stride columns, each its own row stride; outputs (M, C)
//         contiguous.  fwd: y = silu(gate) * up; bwd: (dgate, dup).
// The CUDA kernels are reached through a table the .cu file fills when the library loads (this op
// family's own: the table in common.h belongs to ops.cpp); in a CPU-only build it stays empty and a
// CUDA call says so.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace llm_kernels {

using SwigluBwdOut = std::tuple<at::Tensor, at::Tensor>;  // dgate, dup

// csrc/rope_swiglu_cpu.cpp
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up);
SwigluBwdOut swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up);

// csrc/rope_swiglu_cuda.cu (CUDA build only), through this table
struct RopeSwigluCudaKernels {
  at::Tensor (*rope)(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) = nullptr;
  at::Tensor (*swiglu_fwd)(const at::Tensor&, const at::Tensor&) = nullptr;
  SwigluBwdOut (*swiglu_bwd)(const at::Tensor&, const at::Tensor&, const at::Tensor&) = nullptr;
};
RopeSwigluCudaKernels& rope_swiglu_cuda_kernels();  // defined in rope_swiglu_cpu.cpp

}  // namespace llm_kernels

// Softmax cross-entropy on the GPU: forward (per-row loss and the row's (max, log-sum)) and backward.
//
// Same math as cross_entropy_cpu.cpp (see there): m = max(z), s = sum_j exp(z_j - m),
// loss_row = log(s) - (z_y - m), dlogits = (exp((z - m) - log(s)) - onehot(y)) * dloss / n_valid,
// zero rows for ignored targets; log(s) and z - m are never folded into one rounded lse.  fp32 in
// registers whatever the storage dtype; stats (N, 2) = (m, log s) are saved in fp32.  A NaN or +inf
// logit makes s NaN (exp(+inf - +inf)), so the row's loss and gradient are NaN, as in the reference.
//
// Kernels, then launchers:
// * _ce_fwd_kernel: one block of kThreads per row.  Each thread keeps an online (max m, sum s of
//   exp(z - m)) over the elements it visits, 16 bytes per load: a row of V elements starts at an
//   arbitrary 2- or 4-byte boundary (V = 50257 is odd), so a scalar head runs up to the first
//   16-byte boundary, then 16-byte vectors, then a scalar tail.  Per vector the max is taken first
//   and s rescaled at most once, so each logit costs one exp.  The (m, s) pairs are merged by warp
//   shuffles, then across the warps through shared memory; thread 0 writes (m, log s) and the row's loss
//   (0 for an ignored target).  The mean over the valid rows is a torch sum of the (N,) per-row
//   losses divided by the on-device count of valid targets: deterministic, no atomics, no host sync.
// * _ce_bwd_kernel: one block per row, reads the row once and writes dlogits once, 16-byte vectors
//   when logits and dlogits share their misalignment (always, for fresh contiguous tensors), scalar
//   otherwise.  The scale dloss / max(n_valid, 1) is computed on the device and read through a pointer.
// Out-of-range targets (neither in [0, V) nor ignore_index) cannot be rejected here without a host
// sync, and reading z[y] would be out of bounds, so they give a NaN loss for the row (hence a NaN
// mean) and a NaN dlogits row instead of a trap.  (For CPU tensors ops.cpp and the Python API,
// kernels/_validate.py, reject them with a message; for CUDA tensors the "cuda" backend's wrapper adds
// a device-side assert, kernels/_chunked_linear_ce.check_targets, that fails the next sync.)
// Bytes moved: forward reads the logits once (N * V * sizeof(T)); backward reads them once and writes
// dlogits once (2 * N * V * sizeof(T)).  Limits: N < 2^31 rows (one block each); offsets are int64.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cuSPARSE/cuBLAS headers a minimal toolkit lacks

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "cuda_utils.cuh"

namespace llm_kernels {
namespace {

constexpr int kThreads = 512;  // threads per row (block)
constexpr int kWarpsPerBlock = kThreads / 32;

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// Adds K logits to a thread's online (m, s).  A -inf logit adds nothing (and -inf - -inf would be
// nan); a nan logit makes s nan, as in the reference.
template <int K>
__device__ __forceinline__ void online_add(float& m, float& s, const float (&v)[K]) {
  float vmax = v[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vmax = fmaxf(vmax, v[k]);
  if (vmax > m) {  // rescale once per K values; exp(-inf) = 0 while s is still empty
    s *= __expf(m - vmax);
    m = vmax;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) s += v[k] == -INFINITY ? 0.f : __expf(v[k] - m);
}

// Merges (m2, s2) into (m, s).
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) {  // neither side has seen a finite logit: nothing to rescale
    s += s2;
    return;
  }
  s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
  m = mm;
}

__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    online_merge(m, s, m2, s2);
  }
}

// Elements before the first 16-byte boundary of a row starting at p (at most V).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t V) {
  const int64_t bytes = (16 - static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(p) & 15)) & 15;
  return bytes / static_cast<int64_t>(sizeof(T)) < V ? bytes / static_cast<int64_t>(sizeof(T)) : V;
}

// ------------------------------------------------------------------------------------------ kernels

// grid (N,), block (kThreads,)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    _ce_fwd_kernel(const T* __restrict__ z, const int64_t* __restrict__ y, float* __restrict__ row_loss,
                   float* __restrict__ stats_out, int64_t V, int64_t ignore_index) {
  constexpr int N = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* zr = z + row * V;
  float m = -INFINITY, s = 0.f;

  const int64_t head = head_elems(zr, V);
  for (int64_t c = threadIdx.x; c < head; c += kThreads) {
    const float v[1] = {static_cast<float>(zr[c])};
    online_add(m, s, v);
  }
  const int64_t n_vec = (V - head) / N;
  const auto* zv = reinterpret_cast<const Vec<T, N>*>(zr + head);  // 16-byte aligned
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, N> x = zv[i];
    float v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = static_cast<float>(x.v[k]);
    online_add(m, s, v);
  }
  for (int64_t c = head + n_vec * N + threadIdx.x; c < V; c += kThreads) {
    const float v[1] = {static_cast<float>(zr[c])};
    online_add(m, s, v);
  }

  // block reduction: within each warp, then warp 0 over the kWarpsPerBlock partials
  __shared__ float s_m[kWarpsPerBlock], s_s[kWarpsPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  warp_merge(m, s);
  if (lane == 0) {
    s_m[warp] = m;
    s_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarpsPerBlock ? s_m[lane] : -INFINITY;
    s = lane < kWarpsPerBlock ? s_s[lane] : 0.f;
    warp_merge(m, s);
    if (lane == 0) {
      const float log_s = __logf(s);
      stats_out[2 * row] = m;
      stats_out[2 * row + 1] = log_s;
      const int64_t t = y[row];
      float loss = 0.f;
      if (t != ignore_index) loss = (t >= 0 && t < V) ? log_s - (static_cast<float>(zr[t]) - m) : nan_f();
      row_loss[row] = loss;
    }
  }
}

// grid (N,), block (kThreads,).  N > 1 only when z and g share their misalignment mod 16 bytes.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    _ce_bwd_kernel(const T* __restrict__ z, const int64_t* __restrict__ y, const float* __restrict__ stats_in,
                   const float* __restrict__ scale_in, T* __restrict__ g, int64_t V, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* zr = z + row * V;
  T* gr = g + row * V;
  const int64_t t = y[row];
  const bool ignored = t == ignore_index;
  // an out-of-range target poisons its row with nan, as it does the forward's loss
  const float scale = ignored ? 0.f : (t >= 0 && t < V) ? *scale_in : nan_f();
  const float m = stats_in[2 * row], log_s = stats_in[2 * row + 1];
  // ignored rows are exactly zero, even where their logits are inf or nan
  auto grad = [&](float v, int64_t c) {
    return ignored ? 0.f : (__expf((v - m) - log_s) - (c == t ? 1.f : 0.f)) * scale;
  };

  const int64_t head = N > 1 ? head_elems(zr, V) : 0;
  for (int64_t c = threadIdx.x; c < head; c += kThreads) gr[c] = static_cast<T>(grad(static_cast<float>(zr[c]), c));
  const int64_t n_vec = (V - head) / N;
  const auto* zv = reinterpret_cast<const Vec<T, N>*>(zr + head);
  auto* gv = reinterpret_cast<Vec<T, N>*>(gr + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, N> x = zv[i];
    Vec<T, N> out;
    const int64_t c0 = head + i * N;
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = static_cast<T>(grad(static_cast<float>(x.v[k]), c0 + k));
    gv[i] = out;
  }
  for (int64_t c = head + n_vec * N + threadIdx.x; c < V; c += kThreads) {
    gr[c] = static_cast<T>(grad(static_cast<float>(zr[c]), c));
  }
}

// ---------------------------------------------------------------------------------------- launchers

void check_cuda_dtype(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() != at::kDouble, op, ": the CUDA kernels take float32, float16 or bfloat16; "
              "got logits with dtype ", logits.scalar_type(), " (use the torch backend for float64)");
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows (one block "
              "each), got ", logits.size(0));
}

// 1 / max(n_valid, 1) as a 0-d fp32 device tensor: counted on the device, no host sync.
at::Tensor valid_scale(const at::Tensor& targets, int64_t ignore_index) {
  return targets.ne(ignore_index).sum().clamp_min(1).to(at::kFloat).reciprocal();
}

CrossEntropyFwdOut cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_cuda_dtype("cross_entropy_fwd", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto fopts = logits.options().dtype(at::kFloat);
  auto stats = at::empty({N, 2}, fopts);
  auto row_loss = at::empty({N}, fopts);
  if (N > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    LLM_DISPATCH_CUDA_TYPES(logits.scalar_type(), "cross_entropy_fwd_cuda", [&] {
      _ce_fwd_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), row_loss.mutable_data_ptr<float>(),
          stats.mutable_data_ptr<float>(), V, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // the mean over the valid rows (0 when there are none): a deterministic torch sum, on the device
  auto loss = row_loss.sum() * valid_scale(targets, ignore_index);
  return {loss, stats};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& stats, int64_t ignore_index) {
  check_cuda_dtype("cross_entropy_bwd", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  auto dlogits = at::empty_like(logits);  // contiguous, like logits
  if (N == 0) return dlogits;
  const auto scale = (dloss.to(at::kFloat) * valid_scale(targets, ignore_index)).contiguous();  // 0-d fp32
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(logits.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* zp = logits.const_data_ptr<scalar_t>();
    auto* gp = dlogits.mutable_data_ptr<scalar_t>();
    // rows of z and g start at the same offsets, so they share a head when their bases do
    const bool same_misalignment = (reinterpret_cast<std::uintptr_t>(zp) & 15) == (reinterpret_cast<std::uintptr_t>(gp) & 15);
    const auto* yp = targets.const_data_ptr<int64_t>();
    const auto* lp = stats.const_data_ptr<float>();
    const auto* sp = scale.const_data_ptr<float>();
    if (same_misalignment) {
      _ce_bwd_kernel<scalar_t, kVec><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(zp, yp, lp, sp, gp, V,
                                                                                         ignore_index);
    } else {
      _ce_bwd_kernel<scalar_t, 1><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(zp, yp, lp, sp, gp, V,
                                                                                      ignore_index);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dlogits;
}

// Fill ops.cpp's table when the library loads (this file is compiled only in the CUDA build).
struct Registrar {
  Registrar() {
    cuda_kernels().cross_entropy_fwd = &cross_entropy_fwd_cuda;
    cuda_kernels().cross_entropy_bwd = &cross_entropy_bwd_cuda;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace llm_kernels

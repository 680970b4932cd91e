// RMSNorm on the GPU: forward, and backward as dx per row plus dweight column sums.
//
// Same math as rms_norm_cpu.cpp (see there): rstd = 1/sqrt(mean(x^2) + eps) with mean(x^2) taken of
// the row scaled by a power of two 2^-k near max(max|x|, sqrt(eps)) (exact; no overflow at 1e20, no
// underflow at 1e-20; here 2^-k comes from the float's exponent bits, as in kernels/fused_rmsnorm.py),
// y = x * rstd * w; backward dx = rstd * (g - xhat * mean(g * xhat)) (+ dsum), g = dy * w,
// xhat = x * rstd; dw = sum_rows dy * xhat.  fp32 accumulation for fp32/fp16/bf16, one rounding on
// store; rstd is saved in fp32.  weight may be x's dtype or float32 (the TW template parameter).
//
// add_rms_norm runs the forward with HAS_RES: the first pass reads x and residual once, forms
// s = x + residual in fp32, stores it rounded to x's dtype and takes its max; the later passes re-read
// the stored s (each lane reads back only what it wrote itself, so no synchronisation).  Its backward
// is this backward on s with HAS_DS: the sum's own incoming gradient is added to dx in the same pass.
//
// Kernels, then launchers:
// * _rms_fwd_kernel / _rms_bwd_dx_kernel: one warp per row (kWarps rows per block), the warp strides
//   over the row; reductions by warp shuffles (no shared memory, no __syncthreads).  Each lane moves
//   16 bytes per load (float4 / 8 halves) when C is a multiple of the vector width and every pointer
//   is 16-byte aligned (fp32 weights beside 16-bit x: two 16-byte loads); otherwise the scalar
//   instantiation (N = 1) runs.  The row is re-read from global memory for each pass; a row of
//   C <= ~16K elements stays in L1/L2 between passes.
// * _rms_bwd_dw_partial_kernel: a grid of (column tiles of 32) x (row blocks); each block sums
//   dy * xhat over its rows for its 32 columns (coalesced: a warp reads 32 consecutive columns of one
//   row), reduces its 8 row-lanes in shared memory and writes fp32 partials to an (n_row_blocks, C)
//   buffer; _rms_bwd_dw_reduce_kernel adds the partials in row-block order (deterministic: no
//   atomics) and stores in weight's dtype.
// Bytes moved: forward reads x (3 passes, ideally 1 from DRAM) and writes y: ~2 * M * C * sizeof(T)
// (add_rms_norm: reads x and residual, writes s and y: ~4 * M * C * sizeof(T)); backward reads x and
// dy twice for dx, once more for dw, writes dx: ~5 * M * C * sizeof(T) (+ dsum once with HAS_DS).
// Limits: row offsets are int64 (M * C may pass 2^31); a row must have C < 2^31 elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cuSPARSE/cuBLAS headers a minimal toolkit lacks
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "cuda_utils.cuh"
#include "rms_norm.h"

namespace llm_kernels {
namespace {

constexpr int kWarps = 4;        // rows (warps) per block in the row kernels
constexpr int kTileCols = 32;    // columns per block in the dw partial kernel
constexpr int kTileRows = 8;     // row lanes per block in the dw partial kernel
constexpr int64_t kMaxRowBlocks = 128;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// 2^-k (exact) for 2^k the power of two at or below max(amax, sqrt(eps)): the scaled row has entries
// below 2 in magnitude and eps * 4^-k <= 4.  k from the float's biased exponent e (the value lies in
// [2^(e-127), 2^(e-126))), clamped to [1, 253] so that 2^(127-e) is a normal float.  fmaxf passes over
// a NaN amax; the NaN still reaches the sum of squares.
__device__ __forceinline__ float inv_pow2_scale(float amax, float eps) {
  const float ref = fmaxf(amax, sqrtf(eps));
  const int e = min(max((__float_as_int(ref) >> 23) & 0xFF, 1), 253);
  return __int_as_float((254 - e) << 23);
}

// N elements of TW from p (16-byte aligned when N > 1), widened to float: one or more 16-byte loads.
template <typename TW, int N>
__device__ __forceinline__ void load_float(const TW* p, float (&out)[N]) {
  constexpr int kPer = (16 / static_cast<int>(sizeof(TW))) < N ? 16 / static_cast<int>(sizeof(TW)) : N;
#pragma unroll
  for (int j = 0; j < N / kPer; ++j) {
    const Vec<TW, kPer> v = *reinterpret_cast<const Vec<TW, kPer>*>(p + j * kPer);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[j * kPer + i] = static_cast<float>(v.v[i]);
  }
}

// ------------------------------------------------------------------------------------------ kernels

// HAS_RES: normalize s = x + res, written to s (not __restrict__: the later passes read it back).
template <typename T, typename TW, int N, bool HAS_RES>
__global__ void _rms_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, T* s, const TW* __restrict__ w,
                                T* __restrict__ y, float* __restrict__ rstd_out, int64_t M, int64_t C, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= M) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * C;
  T* yr = y + row * C;

  float amax = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    if constexpr (HAS_RES) {
      const Vec<T, N> rv = *reinterpret_cast<const Vec<T, N>*>(res + row * C + c);
      Vec<T, N> sv;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sv.v[i] = static_cast<T>(static_cast<float>(xv.v[i]) + static_cast<float>(rv.v[i]));
        amax = fmaxf(amax, fabsf(static_cast<float>(sv.v[i])));  // the statistic of the rounded sum, as stored
      }
      *reinterpret_cast<Vec<T, N>*>(s + row * C + c) = sv;
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) amax = fmaxf(amax, fabsf(static_cast<float>(xv.v[i])));
    }
  }
  if constexpr (HAS_RES) xr = s + row * C;  // the same lane wrote these elements above
  const float inv = inv_pow2_scale(warp_max(amax), eps);

  float ssq = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float v = static_cast<float>(xv.v[i]) * inv;  // exact: inv is a power of two
      ssq += v * v;
    }
  }
  const float rstd = inv * rsqrtf(warp_sum(ssq) / static_cast<float>(C) + eps * inv * inv);

  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    float wv[N];
    load_float<TW, N>(w + c, wv);
    Vec<T, N> yv;
#pragma unroll
    for (int i = 0; i < N; ++i) yv.v[i] = static_cast<T>(static_cast<float>(xv.v[i]) * rstd * wv[i]);
    *reinterpret_cast<Vec<T, N>*>(yr + c) = yv;
  }
  if (lane == 0) rstd_out[row] = rstd;
}

// HAS_DS: add ds (the incoming gradient of add_rms_norm's sum output) to dx.
template <typename T, typename TW, int N, bool HAS_DS>
__global__ void _rms_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const TW* __restrict__ w,
                                   const float* __restrict__ rstd_in, const T* __restrict__ ds, T* __restrict__ dx,
                                   int64_t M, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= M) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * C;
  const T* dyr = dy + row * C;
  T* dxr = dx + row * C;
  const float rstd = rstd_in[row];

  float sum_gx = 0.f;  // sum(dy * w * x); times rstd it is sum(g * xhat)
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    const Vec<T, N> dv = *reinterpret_cast<const Vec<T, N>*>(dyr + c);
    float wv[N];
    load_float<TW, N>(w + c, wv);
#pragma unroll
    for (int i = 0; i < N; ++i) sum_gx += static_cast<float>(dv.v[i]) * wv[i] * static_cast<float>(xv.v[i]);
  }
  const float c1 = warp_sum(sum_gx) * rstd / static_cast<float>(C);  // mean(g * xhat)

  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    const Vec<T, N> dv = *reinterpret_cast<const Vec<T, N>*>(dyr + c);
    float wv[N];
    load_float<TW, N>(w + c, wv);
    Vec<T, N> out;
    if constexpr (HAS_DS) {
      const Vec<T, N> sv = *reinterpret_cast<const Vec<T, N>*>(ds + row * C + c);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xhat = static_cast<float>(xv.v[i]) * rstd;
        const float g = static_cast<float>(dv.v[i]) * wv[i];
        out.v[i] = static_cast<T>((g - xhat * c1) * rstd + static_cast<float>(sv.v[i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float xhat = static_cast<float>(xv.v[i]) * rstd;
        const float g = static_cast<float>(dv.v[i]) * wv[i];
        out.v[i] = static_cast<T>((g - xhat * c1) * rstd);
      }
    }
    *reinterpret_cast<Vec<T, N>*>(dxr + c) = out;
  }
}

// grid (ceil(C / kTileCols), n_row_blocks), block (kTileCols, kTileRows)
template <typename T>
__global__ void _rms_bwd_dw_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const float* __restrict__ rstd_in, float* __restrict__ dw_partial,
                                           int64_t M, int64_t C, int64_t rows_per_block) {
  __shared__ float s_dw[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < M ? r_begin + rows_per_block : M;
  float acc = 0.f;
  if (col < C) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kTileRows) {
      acc += static_cast<float>(dy[r * C + col]) * (static_cast<float>(x[r * C + col]) * rstd_in[r]);
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < C) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) sum += s_dw[i][threadIdx.x];
    dw_partial[static_cast<int64_t>(blockIdx.y) * C + col] = sum;
  }
}

template <typename TW>
__global__ void _rms_bwd_dw_reduce_kernel(const float* __restrict__ dw_partial, TW* __restrict__ dw,
                                          int64_t n_row_blocks, int64_t C) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= C) return;
  float sum = 0.f;
  for (int64_t blk = 0; blk < n_row_blocks; ++blk) sum += dw_partial[blk * C + col];
  dw[col] = static_cast<TW>(sum);
}

// ---------------------------------------------------------------------------------------- launchers

// 16-byte vectors when C is a multiple of the width and every row pointer is 16-byte aligned
// (a null pointer, an absent residual or dsum, counts as aligned).
template <typename T>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int64_t N = 16 / sizeof(T);
  if (C % N != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// Runs body.template operator()<TW>() with TW the C++ type of weight: x's T, or float.
template <typename T, typename Body>
void with_weight_type(const at::Tensor& weight, const Body& body) {
  if (weight.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    body.template operator()<T>();
  } else {
    body.template operator()<float>();
  }
}

void check_not_double(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": the CUDA kernels take float32, float16 or bfloat16; got x "
              "with dtype ", x.scalar_type(), " (use the torch backend for float64)");
}

// The forward of rms_norm (res undefined) and add_rms_norm (res and s defined), into y and rstd.
void rms_fwd(const char* op, const at::Tensor& x, const at::Tensor& res, const at::Tensor& s, const at::Tensor& weight,
             double eps, const at::Tensor& y, const at::Tensor& rstd) {
  check_not_double(op, x);
  const int64_t C = x.size(-1), M = x.numel() / C;
  if (M == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(32, kWarps);
  const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
  const float feps = static_cast<float>(eps);
  LLM_DISPATCH_CUDA_TYPES(x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    using T = scalar_t;
    with_weight_type<T>(weight, [&]<typename TW>() {
      constexpr int kVec = 16 / sizeof(T);
      const auto* xp = x.const_data_ptr<T>();
      const auto* resp = res.defined() ? res.const_data_ptr<T>() : nullptr;
      auto* sp = s.defined() ? s.mutable_data_ptr<T>() : nullptr;
      const auto* wp = weight.const_data_ptr<TW>();
      auto* yp = y.mutable_data_ptr<T>();
      auto* rp = rstd.mutable_data_ptr<float>();
      const bool vec = can_vectorize<T>(C, {xp, resp, sp, wp, yp});
      if (resp != nullptr && vec) {
        _rms_fwd_kernel<T, TW, kVec, true><<<grid, block, 0, stream>>>(xp, resp, sp, wp, yp, rp, M, C, feps);
      } else if (resp != nullptr) {
        _rms_fwd_kernel<T, TW, 1, true><<<grid, block, 0, stream>>>(xp, resp, sp, wp, yp, rp, M, C, feps);
      } else if (vec) {
        _rms_fwd_kernel<T, TW, kVec, false><<<grid, block, 0, stream>>>(xp, resp, sp, wp, yp, rp, M, C, feps);
      } else {
        _rms_fwd_kernel<T, TW, 1, false><<<grid, block, 0, stream>>>(xp, resp, sp, wp, yp, rp, M, C, feps);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

RmsNormFwdOut rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));  // one per row
  rms_fwd("rms_norm_fwd", x, at::Tensor(), at::Tensor(), weight, eps, y, rstd);
  return {y, rstd};
}

AddRmsNormFwdOut add_rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                       double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto sum = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));  // one per row
  rms_fwd("add_rms_norm_fwd", x, residual, sum, weight, eps, y, rstd);
  return {y, sum, rstd};
}

RmsNormBwdOut rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& rstd, const at::Tensor& dsum) {
  check_not_double("rms_norm_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1), M = x.numel() / C;
  auto dx = at::empty_like(x);
  if (M == 0) return {dx, at::zeros_like(weight)};
  auto dw = at::empty_like(weight);
  const int64_t n_row_blocks = std::min<int64_t>(kMaxRowBlocks, (M + 31) / 32);
  const int64_t rows_per_block = (M + n_row_blocks - 1) / n_row_blocks;
  auto partial = at::empty({n_row_blocks, C}, x.options().dtype(at::kFloat));  // fp32 dw partials
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    using T = scalar_t;
    with_weight_type<T>(weight, [&]<typename TW>() {
      constexpr int kVec = 16 / sizeof(T);
      const auto* dyp = dy.const_data_ptr<T>();
      const auto* xp = x.const_data_ptr<T>();
      const auto* wp = weight.const_data_ptr<TW>();
      const auto* rp = rstd.const_data_ptr<float>();
      const auto* dsp = dsum.defined() ? dsum.const_data_ptr<T>() : nullptr;
      auto* dxp = dx.mutable_data_ptr<T>();
      const dim3 block(32, kWarps);
      const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
      const bool vec = can_vectorize<T>(C, {dyp, xp, wp, dsp, dxp});
      if (dsp != nullptr && vec) {
        _rms_bwd_dx_kernel<T, TW, kVec, true><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dsp, dxp, M, C);
      } else if (dsp != nullptr) {
        _rms_bwd_dx_kernel<T, TW, 1, true><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dsp, dxp, M, C);
      } else if (vec) {
        _rms_bwd_dx_kernel<T, TW, kVec, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dsp, dxp, M, C);
      } else {
        _rms_bwd_dx_kernel<T, TW, 1, false><<<grid, block, 0, stream>>>(dyp, xp, wp, rp, dsp, dxp, M, C);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      float* dw_partial = partial.mutable_data_ptr<float>();
      const dim3 pgrid(static_cast<unsigned>((C + kTileCols - 1) / kTileCols), static_cast<unsigned>(n_row_blocks));
      _rms_bwd_dw_partial_kernel<T><<<pgrid, dim3(kTileCols, kTileRows), 0, stream>>>(dyp, xp, rp, dw_partial, M, C,
                                                                                       rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      _rms_bwd_dw_reduce_kernel<TW><<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(
          dw_partial, dw.mutable_data_ptr<TW>(), n_row_blocks, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw};
}

// Fill rms_norm_ops.cpp's table when the library loads (this file is compiled only in the CUDA build).
struct Registrar {
  Registrar() {
    rms_norm_cuda_kernels().fwd = &rms_norm_fwd_cuda;
    rms_norm_cuda_kernels().add_fwd = &add_rms_norm_fwd_cuda;
    rms_norm_cuda_kernels().bwd = &rms_norm_bwd_cuda;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace llm_kernels

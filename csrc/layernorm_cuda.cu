// LayerNorm on the GPU: forward, and backward as dx per row plus dweight/dbias column sums.
//
// add_layer_norm runs the same forward kernel with HAS_RES: the first pass reads x and residual once,
// forms s = x + residual in fp32, stores it rounded to x's dtype and sums that; the later passes
// re-read the stored s (each lane reads back only what it wrote itself, so no synchronisation).
//
// Same math as layernorm_cpu.cpp (see there): two-pass mean/variance per row (the mean's sum shifted by
// the row's first element), y = xhat * w + b with
// xhat = (x - mean) * rstd; backward dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w;
// dw = sum_rows dy * xhat, db = sum_rows dy.  fp32 accumulation for fp32/fp16/bf16, one rounding on
// store; mean and rstd are saved in fp32.
//
// Kernels, then launchers:
// * _ln_fwd_kernel / _ln_bwd_dx_kernel: one warp per row (kWarps rows per block), the warp strides
//   over the row; reductions by warp shuffles (no shared memory, no __syncthreads).  Each lane moves
//   16 bytes per load (float4 / 8 halves) when C is a multiple of the vector width and every pointer
//   is 16-byte aligned; otherwise the scalar instantiation (N = 1) runs.  The row is re-read from
//   global memory for each pass; a row of C <= ~16K elements stays in L1/L2 between passes.
// * _ln_bwd_dwdb_partial_kernel: a grid of (column tiles of 32) x (row blocks); each block sums
//   dy * xhat and dy over its rows for its 32 columns (coalesced: a warp reads 32 consecutive
//   columns of one row), reduces its 8 row-lanes in shared memory and writes fp32 partials to an
//   (n_row_blocks, C) buffer; _ln_bwd_dwdb_reduce_kernel adds the partials in row-block order
//   (deterministic: no atomics) and stores in weight's dtype.
// Bytes moved: forward reads x (3 passes, ideally 1 from DRAM) and writes y: ~2 * M * C * sizeof(T)
// (add_layer_norm: reads x and residual, writes s and y: ~4 * M * C * sizeof(T));
// backward reads x and dy twice for dx, once more for dw/db, writes dx: ~5 * M * C * sizeof(T).
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

namespace llm_kernels {
namespace {

constexpr int kWarps = 4;        // rows (warps) per block in the row kernels
constexpr int kTileCols = 32;    // columns per block in the dw/db partial kernel
constexpr int kTileRows = 8;     // row lanes per block in the dw/db partial kernel
constexpr int64_t kMaxRowBlocks = 128;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ------------------------------------------------------------------------------------------ kernels

// HAS_RES: normalize s = x + res, written to s (not __restrict__: the later passes read it back).
template <typename T, int N, bool HAS_RES>
__global__ void _ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, T* s, const T* __restrict__ w,
                               const T* __restrict__ b, T* __restrict__ y, float* __restrict__ mean_out,
                               float* __restrict__ rstd_out, int64_t M, int64_t C, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= M) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * C;
  T* yr = y + row * C;

  // The sums run over x - shift, with shift the row's first (stored) element: a constant row gets an
  // exact mean (and normalizes to exactly 0), and rows like 1e4 + noise keep small summands.
  float shift = static_cast<float>(xr[0]);
  if constexpr (HAS_RES) shift = static_cast<float>(static_cast<T>(shift + static_cast<float>(res[row * C])));
  float sum = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    if constexpr (HAS_RES) {
      const Vec<T, N> rv = *reinterpret_cast<const Vec<T, N>*>(res + row * C + c);
      Vec<T, N> sv;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        sv.v[i] = static_cast<T>(static_cast<float>(xv.v[i]) + static_cast<float>(rv.v[i]));
        sum += static_cast<float>(sv.v[i]) - shift;  // the statistics of the rounded sum, as stored
      }
      *reinterpret_cast<Vec<T, N>*>(s + row * C + c) = sv;
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) sum += static_cast<float>(xv.v[i]) - shift;
    }
  }
  if constexpr (HAS_RES) xr = s + row * C;  // the same lane wrote these elements above
  const float mean = shift + warp_sum(sum) / static_cast<float>(C);

  float sq = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float d = static_cast<float>(xv.v[i]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / static_cast<float>(C) + eps);

  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    const Vec<T, N> wv = *reinterpret_cast<const Vec<T, N>*>(w + c);
    const Vec<T, N> bv = *reinterpret_cast<const Vec<T, N>*>(b + c);
    Vec<T, N> yv;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float xhat = (static_cast<float>(xv.v[i]) - mean) * rstd;
      yv.v[i] = static_cast<T>(xhat * static_cast<float>(wv.v[i]) + static_cast<float>(bv.v[i]));
    }
    *reinterpret_cast<Vec<T, N>*>(yr + c) = yv;
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int N>
__global__ void _ln_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                  const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                  T* __restrict__ dx, int64_t M, int64_t C) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y;
  if (row >= M) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * C;
  const T* dyr = dy + row * C;
  T* dxr = dx + row * C;
  const float mean = mean_in[row], rstd = rstd_in[row];

  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    const Vec<T, N> dv = *reinterpret_cast<const Vec<T, N>*>(dyr + c);
    const Vec<T, N> wv = *reinterpret_cast<const Vec<T, N>*>(w + c);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float g = static_cast<float>(dv.v[i]) * static_cast<float>(wv.v[i]);
      sum_g += g;
      sum_gx += g * (static_cast<float>(xv.v[i]) - mean) * rstd;
    }
  }
  const float c1 = warp_sum(sum_gx) / static_cast<float>(C);
  const float c2 = warp_sum(sum_g) / static_cast<float>(C);

  for (int64_t c = static_cast<int64_t>(lane) * N; c < C; c += 32 * N) {
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(xr + c);
    const Vec<T, N> dv = *reinterpret_cast<const Vec<T, N>*>(dyr + c);
    const Vec<T, N> wv = *reinterpret_cast<const Vec<T, N>*>(w + c);
    Vec<T, N> out;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float g = static_cast<float>(dv.v[i]) * static_cast<float>(wv.v[i]);
      const float xhat = (static_cast<float>(xv.v[i]) - mean) * rstd;
      out.v[i] = static_cast<T>((g - c2 - xhat * c1) * rstd);
    }
    *reinterpret_cast<Vec<T, N>*>(dxr + c) = out;
  }
}

// grid (ceil(C / kTileCols), n_row_blocks), block (kTileCols, kTileRows)
template <typename T>
__global__ void _ln_bwd_dwdb_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                            const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                            float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                            int64_t M, int64_t C, int64_t rows_per_block) {
  __shared__ float s_dw[kTileRows][kTileCols + 1];
  __shared__ float s_db[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < M ? r_begin + rows_per_block : M;
  float acc_dw = 0.f, acc_db = 0.f;
  if (col < C) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kTileRows) {
      const float d = static_cast<float>(dy[r * C + col]);
      const float xhat = (static_cast<float>(x[r * C + col]) - mean_in[r]) * rstd_in[r];
      acc_dw += d * xhat;
      acc_db += d;
    }
  }
  s_dw[threadIdx.y][threadIdx.x] = acc_dw;
  s_db[threadIdx.y][threadIdx.x] = acc_db;
  __syncthreads();
  if (threadIdx.y == 0 && col < C) {
    float sdw = 0.f, sdb = 0.f;
#pragma unroll
    for (int i = 0; i < kTileRows; ++i) {
      sdw += s_dw[i][threadIdx.x];
      sdb += s_db[i][threadIdx.x];
    }
    dw_partial[static_cast<int64_t>(blockIdx.y) * C + col] = sdw;
    db_partial[static_cast<int64_t>(blockIdx.y) * C + col] = sdb;
  }
}

template <typename T>
__global__ void _ln_bwd_dwdb_reduce_kernel(const float* __restrict__ dw_partial, const float* __restrict__ db_partial,
                                           T* __restrict__ dw, T* __restrict__ db, int64_t n_row_blocks, int64_t C) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= C) return;
  float sdw = 0.f, sdb = 0.f;
  for (int64_t blk = 0; blk < n_row_blocks; ++blk) {
    sdw += dw_partial[blk * C + col];
    sdb += db_partial[blk * C + col];
  }
  dw[col] = static_cast<T>(sdw);
  db[col] = static_cast<T>(sdb);
}

// ---------------------------------------------------------------------------------------- launchers

// 16-byte vectors when C is a multiple of the width and every row pointer is 16-byte aligned
// (a null pointer, an absent residual, counts as aligned).
template <typename T>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int64_t N = 16 / sizeof(T);
  if (C % N != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// The forward of layer_norm (res undefined) and add_layer_norm (res and s defined), into y, mean, rstd.
void ln_fwd(const char* op, const at::Tensor& x, const at::Tensor& res, const at::Tensor& s, const at::Tensor& weight,
            const at::Tensor& bias, double eps, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, op, ": the CUDA kernels take float32, float16 or bfloat16; got x "
              "with dtype ", x.scalar_type(), " (use the torch backend for float64)");
  const int64_t M = x.size(0), C = x.size(1);
  if (M == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(32, kWarps);
  const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
  const float feps = static_cast<float>(eps);
  LLM_DISPATCH_CUDA_TYPES(x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* resp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    auto* sp = s.defined() ? s.mutable_data_ptr<scalar_t>() : nullptr;
    const auto* wp = weight.const_data_ptr<scalar_t>();
    const auto* bp = bias.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    auto* mp = mean.mutable_data_ptr<float>();
    auto* rp = rstd.mutable_data_ptr<float>();
    const bool vec = can_vectorize<scalar_t>(C, {xp, resp, sp, wp, bp, yp});
    if (resp != nullptr && vec) {
      _ln_fwd_kernel<scalar_t, kVec, true><<<grid, block, 0, stream>>>(xp, resp, sp, wp, bp, yp, mp, rp, M, C, feps);
    } else if (resp != nullptr) {
      _ln_fwd_kernel<scalar_t, 1, true><<<grid, block, 0, stream>>>(xp, resp, sp, wp, bp, yp, mp, rp, M, C, feps);
    } else if (vec) {
      _ln_fwd_kernel<scalar_t, kVec, false><<<grid, block, 0, stream>>>(xp, resp, sp, wp, bp, yp, mp, rp, M, C, feps);
    } else {
      _ln_fwd_kernel<scalar_t, 1, false><<<grid, block, 0, stream>>>(xp, resp, sp, wp, bp, yp, mp, rp, M, C, feps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

LayerNormFwdOut layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                    double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  ln_fwd("layer_norm_fwd", x, at::Tensor(), at::Tensor(), weight, bias, eps, y, mean, rstd);
  return {y, mean, rstd};
}

AddLayerNormFwdOut add_layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                           const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto sum = at::empty_like(x);
  auto mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  ln_fwd("add_layer_norm_fwd", x, residual, sum, weight, bias, eps, y, mean, rstd);
  return {y, sum, mean, rstd};
}

LayerNormBwdOut layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, "layer_norm_bwd: the CUDA kernels take float32, float16 or "
              "bfloat16; got x with dtype ", x.scalar_type(), " (use the torch backend for float64)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  if (M == 0) return {dx, at::zeros_like(weight), at::zeros_like(weight)};
  auto dw = at::empty_like(weight);
  auto db = at::empty_like(weight);
  const int64_t n_row_blocks = std::min<int64_t>(kMaxRowBlocks, (M + 31) / 32);
  const int64_t rows_per_block = (M + n_row_blocks - 1) / n_row_blocks;
  auto partial = at::empty({2, n_row_blocks, C}, x.options().dtype(at::kFloat));  // fp32 dw, db partials
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(x.scalar_type(), "layer_norm_bwd_cuda", [&] {
    const auto* dyp = dy.const_data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* wp = weight.const_data_ptr<scalar_t>();
    const auto* mp = mean.const_data_ptr<float>();
    const auto* rp = rstd.const_data_ptr<float>();
    auto* dxp = dx.mutable_data_ptr<scalar_t>();
    const dim3 block(32, kWarps);
    const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
    if (can_vectorize<scalar_t>(C, {dyp, xp, wp, dxp})) {
      _ln_bwd_dx_kernel<scalar_t, 16 / sizeof(scalar_t)><<<grid, block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, M, C);
    } else {
      _ln_bwd_dx_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, M, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    float* dw_partial = partial.mutable_data_ptr<float>();
    float* db_partial = dw_partial + n_row_blocks * C;
    const dim3 pgrid(static_cast<unsigned>((C + kTileCols - 1) / kTileCols), static_cast<unsigned>(n_row_blocks));
    _ln_bwd_dwdb_partial_kernel<scalar_t><<<pgrid, dim3(kTileCols, kTileRows), 0, stream>>>(
        dyp, xp, mp, rp, dw_partial, db_partial, M, C, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _ln_bwd_dwdb_reduce_kernel<scalar_t><<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(
        dw_partial, db_partial, dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>(), n_row_blocks, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw, db};
}

// Fill ops.cpp's table when the library loads (this file is compiled only in the CUDA build).
struct Registrar {
  Registrar() {
    cuda_kernels().layer_norm_fwd = &layer_norm_fwd_cuda;
    cuda_kernels().layer_norm_bwd = &layer_norm_bwd_cuda;
    cuda_kernels().add_layer_norm_fwd = &add_layer_norm_fwd_cuda;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace llm_kernels

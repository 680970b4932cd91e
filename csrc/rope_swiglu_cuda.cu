// RoPE and SwiGLU on the GPU: the CUDA kernels behind rope_fwd/rope_bwd and swiglu_fwd/swiglu_bwd.
//
// Same math as rope_swiglu_cpu.cpp (see there for the ops and the layouts they are called with):
//   rope:   y1 = x1*cos - x2*s, y2 = x2*cos + x1*s with s = sin (forward) or -sin (backward: the
//           inverse rotation), x1, x2 the two halves of the head dim;
//   swiglu: y = g*s*u; dg = dy*u*s*(1 + g*(1 - s)), du = dy*g*s, with s = sigmoid(g) and 1 - s taken
//           from e = exp(-|g|) in (0, 1] (no overflow, no cancellation).
// fp32 math for float/half/bfloat16, one rounding on store; float64 goes to the torch backend.
//
// Kernels, then launchers:
// * _rope_kernel: grid (B*H, position blocks), block (CH, rows): a block owns one (b, h) and blockDim.y
//   positions (a grid-stride loop over T past 65,535 blocks), each thread N planes of a position.  No
//   integer division per element: (b, h) comes from blockIdx.x once.  N = 16 bytes of x (8 halves or 4
//   floats) with cos/sin as float4s when D/2 is a multiple of N and every base pointer and stride is
//   16-byte aligned (x's B/H/T strides may be anything: q and k are views of a fused projection);
//   otherwise the scalar instantiation (N = 1) runs.
// * _swiglu_fwd_kernel / _swiglu_bwd_kernel: (M, C) rows, each input with its own row stride (one flat
//   row when all are contiguous); grid (column chunks, row blocks), a thread N consecutive elements
//   (16 bytes) of a row, the row's ragged tail element by element.  Vector loads when every base
//   pointer is 16-byte aligned and every row stride a multiple of N.
// `C10_CUDA_KERNEL_LAUNCH_CHECK()` after every launch.
// Bytes moved: rope reads x and writes y (2 * N * b; cos/sin are T*D*4 bytes, from L2 for all heads);
// swiglu forward reads g, u and writes y (3 * N * b), backward reads g, u, dy and writes dg, du (5 * N * b).
// Limits: offsets are int64; B*H < 2^31 (grid axis 0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cuSPARSE/cuBLAS headers a minimal toolkit lacks

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "cuda_utils.cuh"
#include "rope_swiglu.h"

namespace llm_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// N consecutive floats from p: float4 loads when N is a multiple of 4 (p then 16-byte aligned)
template <int N>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 v = reinterpret_cast<const float4*>(p)[k];
      out[4 * k] = v.x;
      out[4 * k + 1] = v.y;
      out[4 * k + 2] = v.z;
      out[4 * k + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = p[k];
  }
}

// s = sigmoid(g), oms = 1 - s, from e = exp(-|g|) in (0, 1] (the division's denominator is in [1, 2])
__device__ __forceinline__ void sigmoid_pair(float g, float& s, float& oms) {
  const float e = __expf(-fabsf(g));
  const float inv = 1.0f / (1.0f + e);
  s = g >= 0.0f ? inv : e * inv;
  oms = g >= 0.0f ? e * inv : inv;
}

// ------------------------------------------------------------------------------------------ kernels

// y (B, H, T, D) contiguous; x with strides (sxb, sxh, sxt, 1); cos/sin (T, half) with row strides sct, sst
template <typename T, int N, bool INVERSE>
__global__ void _rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                             T* __restrict__ y, int64_t H, int64_t n_pos, int64_t half, int64_t sxb, int64_t sxh,
                             int64_t sxt, int64_t sct, int64_t sst) {
  const int64_t bh = blockIdx.x;
  const T* xbh = x + (bh / H) * sxb + (bh % H) * sxh;
  T* ybh = y + bh * n_pos * 2 * half;
  for (int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; t < n_pos;
       t += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* xr = xbh + t * sxt;
    T* yr = ybh + t * 2 * half;
    const float* cr = cos + t * sct;
    const float* sr = sin + t * sst;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < half; i += static_cast<int64_t>(blockDim.x) * N) {
      const Vec<T, N> x1 = *reinterpret_cast<const Vec<T, N>*>(xr + i);
      const Vec<T, N> x2 = *reinterpret_cast<const Vec<T, N>*>(xr + half + i);
      float c[N], s[N];
      load_floats<N>(cr + i, c);
      load_floats<N>(sr + i, s);
      Vec<T, N> y1, y2;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float a = static_cast<float>(x1.v[k]), b = static_cast<float>(x2.v[k]);
        const float sk = INVERSE ? -s[k] : s[k];
        y1.v[k] = static_cast<T>(a * c[k] - b * sk);
        y2.v[k] = static_cast<T>(b * c[k] + a * sk);
      }
      *reinterpret_cast<Vec<T, N>*>(yr + i) = y1;
      *reinterpret_cast<Vec<T, N>*>(yr + half + i) = y2;
    }
  }
}

// grid (ceil(ceil(C / N) / blockDim.x), row blocks), block (CX, RY); y (M, C) contiguous
template <typename T, int N>
__global__ void _swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int64_t M,
                                   int64_t C, int64_t sg, int64_t su) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  if (c0 >= C) return;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* gr = g + r * sg + c0;
    const T* ur = u + r * su + c0;
    T* yr = y + r * C + c0;
    if (N > 1 && c0 + N <= C) {
      const Vec<T, N> gv = *reinterpret_cast<const Vec<T, N>*>(gr);
      const Vec<T, N> uv = *reinterpret_cast<const Vec<T, N>*>(ur);
      Vec<T, N> yv;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float gk = static_cast<float>(gv.v[k]);
        float s, oms;
        sigmoid_pair(gk, s, oms);
        yv.v[k] = static_cast<T>(gk * s * static_cast<float>(uv.v[k]));
      }
      *reinterpret_cast<Vec<T, N>*>(yr) = yv;
    } else {  // the scalar instantiation, or a row's last C % N elements
      for (int64_t k = 0; k < N && c0 + k < C; ++k) {
        const float gk = static_cast<float>(gr[k]);
        float s, oms;
        sigmoid_pair(gk, s, oms);
        yr[k] = static_cast<T>(gk * s * static_cast<float>(ur[k]));
      }
    }
  }
}

template <typename T, int N>
__global__ void _swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                   T* __restrict__ dg, T* __restrict__ du, int64_t M, int64_t C, int64_t sdy,
                                   int64_t sg, int64_t su) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  if (c0 >= C) return;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const T* dyr = dy + r * sdy + c0;
    const T* gr = g + r * sg + c0;
    const T* ur = u + r * su + c0;
    T* dgr = dg + r * C + c0;
    T* dur = du + r * C + c0;
    if (N > 1 && c0 + N <= C) {
      const Vec<T, N> dv = *reinterpret_cast<const Vec<T, N>*>(dyr);
      const Vec<T, N> gv = *reinterpret_cast<const Vec<T, N>*>(gr);
      const Vec<T, N> uv = *reinterpret_cast<const Vec<T, N>*>(ur);
      Vec<T, N> dgv, duv;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float d = static_cast<float>(dv.v[k]), gk = static_cast<float>(gv.v[k]);
        float s, oms;
        sigmoid_pair(gk, s, oms);
        dgv.v[k] = static_cast<T>(d * static_cast<float>(uv.v[k]) * s * (1.0f + gk * oms));
        duv.v[k] = static_cast<T>(d * gk * s);
      }
      *reinterpret_cast<Vec<T, N>*>(dgr) = dgv;
      *reinterpret_cast<Vec<T, N>*>(dur) = duv;
    } else {
      for (int64_t k = 0; k < N && c0 + k < C; ++k) {
        const float d = static_cast<float>(dyr[k]), gk = static_cast<float>(gr[k]);
        float s, oms;
        sigmoid_pair(gk, s, oms);
        dgr[k] = static_cast<T>(d * static_cast<float>(ur[k]) * s * (1.0f + gk * oms));
        dur[k] = static_cast<T>(d * gk * s);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- launchers

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

void check_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": the CUDA kernels take float32, float16 or bfloat16; got ",
              "dtype ", t.scalar_type(), " (use the torch backend for float64)");
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  return std::all_of(ptrs.begin(), ptrs.end(), [](const void* p) { return aligned16(p); });
}

bool all_multiple(std::initializer_list<int64_t> values, int64_t n) {
  return std::all_of(values.begin(), values.end(), [n](int64_t v) { return v % n == 0; });
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  check_dtype(inverse ? "rope_bwd" : "rope_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), half = x.size(3) / 2;
  if (y.numel() == 0) return y;
  TORCH_CHECK(B * H <= INT32_MAX, inverse ? "rope_bwd" : "rope_fwd", ": B * H = ", B * H,
              " heads exceed the CUDA kernel's grid (one block per (b, h), at most 2^31 - 1)");
  const int64_t sxb = x.stride(0), sxh = x.stride(1), sxt = x.stride(2), sct = cos.stride(0), sst = sin.stride(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(x.scalar_type(), "rope_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* cp = cos.const_data_ptr<float>();
    const auto* sp = sin.const_data_ptr<float>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = half % kVec == 0 && all_aligned({xp, cp, sp, yp}) && all_multiple({sxb, sxh, sxt}, kVec) &&
                     all_multiple({sct, sst}, 4);
    const int64_t n = vec ? kVec : 1;
    const int64_t ch = std::min<int64_t>(next_pow2(half / n), kThreads);  // threads along the planes
    const int64_t ry = std::min<int64_t>(kThreads / ch, next_pow2(T));    // positions per block
    const dim3 block(static_cast<unsigned>(ch), static_cast<unsigned>(ry));
    const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>(std::min<int64_t>((T + ry - 1) / ry, kMaxGridY)));
    const auto args = [&](auto kernel) {
      kernel<<<grid, block, 0, stream>>>(xp, cp, sp, yp, H, T, half, sxb, sxh, sxt, sct, sst);
    };
    if (vec && inverse) {
      args(_rope_kernel<scalar_t, kVec, true>);
    } else if (vec) {
      args(_rope_kernel<scalar_t, kVec, false>);
    } else if (inverse) {
      args(_rope_kernel<scalar_t, 1, true>);
    } else {
      args(_rope_kernel<scalar_t, 1, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// block (CX, RY) and grid for (M, C) rows at n elements per thread
void swiglu_launch_dims(int64_t M, int64_t C, int64_t n, dim3& grid, dim3& block) {
  const int64_t chunks = (C + n - 1) / n;
  const int64_t cx = std::clamp<int64_t>(next_pow2(chunks), 32, kThreads);
  const int64_t ry = std::min<int64_t>(kThreads / cx, next_pow2(M));
  block = dim3(static_cast<unsigned>(cx), static_cast<unsigned>(ry));
  grid = dim3(static_cast<unsigned>((chunks + cx - 1) / cx), static_cast<unsigned>(std::min<int64_t>((M + ry - 1) / ry, kMaxGridY)));
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_dtype("swiglu_fwd", gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto y = at::empty(gate.sizes(), gate.options());  // (M, C) contiguous
  const int64_t M = gate.size(0), C = gate.size(1), sg = gate.stride(0), su = up.stride(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* gp = gate.const_data_ptr<scalar_t>();
    const auto* up_ = up.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = all_aligned({gp, up_, yp}) && (M == 1 || all_multiple({sg, su, C}, kVec));
    dim3 grid, block;
    swiglu_launch_dims(M, C, vec ? kVec : 1, grid, block);
    if (vec) {
      _swiglu_fwd_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(gp, up_, yp, M, C, sg, su);
    } else {
      _swiglu_fwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(gp, up_, yp, M, C, sg, su);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

SwigluBwdOut swiglu_bwd_cuda(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  check_dtype("swiglu_bwd", gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto dg = at::empty(gate.sizes(), gate.options());
  auto du = at::empty(gate.sizes(), gate.options());
  const int64_t M = gate.size(0), C = gate.size(1), sdy = dy.stride(0), sg = gate.stride(0), su = up.stride(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LLM_DISPATCH_CUDA_TYPES(gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* dyp = dy.const_data_ptr<scalar_t>();
    const auto* gp = gate.const_data_ptr<scalar_t>();
    const auto* up_ = up.const_data_ptr<scalar_t>();
    auto* dgp = dg.mutable_data_ptr<scalar_t>();
    auto* dup = du.mutable_data_ptr<scalar_t>();
    const bool vec = all_aligned({dyp, gp, up_, dgp, dup}) && (M == 1 || all_multiple({sdy, sg, su, C}, kVec));
    dim3 grid, block;
    swiglu_launch_dims(M, C, vec ? kVec : 1, grid, block);
    if (vec) {
      _swiglu_bwd_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(dyp, gp, up_, dgp, dup, M, C, sdy, sg, su);
    } else {
      _swiglu_bwd_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(dyp, gp, up_, dgp, dup, M, C, sdy, sg, su);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dg, du};
}

// Fill rope_swiglu_cpu.cpp's table when the library loads (this file is compiled only in the CUDA build).
struct Registrar {
  Registrar() {
    rope_swiglu_cuda_kernels().rope = &rope_cuda;
    rope_swiglu_cuda_kernels().swiglu_fwd = &swiglu_fwd_cuda;
    rope_swiglu_cuda_kernels().swiglu_bwd = &swiglu_bwd_cuda;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace llm_kernels

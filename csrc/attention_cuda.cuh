// Shared pieces of the causal-attention CUDA kernels (attention_cuda.cu: forward; attention_bwd_cuda.cu:
// backward): tile constants, the mma.sync m16n8k16 wrapper and its fragment loaders, the 16-byte tile
// loads, and the launchers' helpers.  See attention_cuda.cu for the algorithm and the fragment layouts.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace llm_kernels {

// The two launchers (one per .cu file); attention_cuda.cu puts both in ops.cpp's table.
AttentionFwdOut attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
AttentionBwdOut attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale);

// The fwd, dK/dV and dQ kernels multiply with mma.sync.m16n8k16 (fp16 and bf16 in, fp32 out), which
// needs sm_80.  A build that also targets an older arch (7.5: Turing, for LayerNorm and cross-entropy)
// compiles their bodies only for sm_80 and newer and leaves a __trap() for the older one; the launchers
// refuse a GPU below 8.0 first (check_cuda_inputs), saying so, as kernels/_cuda_backend.py does before.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LLM_ATTN_SM80 0
#else
#define LLM_ATTN_SM80 1
#endif

namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 64;  // queries per block in the forward and dQ kernels (16 per warp)
constexpr int kBlockN = 64;  // keys per tile (16 per warp in the dK/dV kernel)
constexpr int kPad = 8;      // halves of padding per smem row (keeps 16-byte row alignment)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// queries per step of the dK/dV kernel: D = 128 holds 2 x 64 fp32 accumulators per thread already
template <int D>
constexpr int bwd_block_m() {
  return D == 128 ? 32 : 64;
}

// Min blocks per SM for the forward's __launch_bounds__ (0 = no hint).  Left alone, ptxas capped D = 64
// at 128 registers and spilled 12 bytes on sm_90; asking for 3 blocks allows 170 (it uses 144-150, no
// spill).  D = 128 needs ~168 with no hint; a hint of 3 would spill there instead.
template <int D>
constexpr int fwd_min_blocks() {
  return D == 64 ? 3 : 0;
}

// ------------------------------------------------------------------------------- fragment helpers

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static constexpr uint32_t kExp2 = 0x7C007C00u;  // the exponent bits of two halves: all ones = inf or nan
  static __device__ __forceinline__ bool nonfinite(uint16_t bits) { return (bits & 0x7C00u) == 0x7C00u; }  // inf, nan
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x = lo in the low 16 bits
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
};

template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kExp2 = 0x7F807F80u;
  static __device__ __forceinline__ bool nonfinite(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }  // inf, nan
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
};

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A fragment of the 16x16 block whose element (r, c) is p[r * ld + c] (row-major: two adjacent
// columns are one 32-bit load)
__device__ __forceinline__ void load_a(uint32_t a[4], const uint16_t* p, int ld, int g, int t) {
  a[0] = ld32(p + g * ld + 2 * t);
  a[1] = ld32(p + (g + 8) * ld + 2 * t);
  a[2] = ld32(p + g * ld + 2 * t + 8);
  a[3] = ld32(p + (g + 8) * ld + 2 * t + 8);
}

// B fragment (16 x 8, k x n) whose element (k, n) is p[n * ld + k]: e.g. K^T read from K's rows
__device__ __forceinline__ void load_b_nk(uint32_t b[2], const uint16_t* p, int ld, int g, int t) {
  b[0] = ld32(p + g * ld + 2 * t);
  b[1] = ld32(p + g * ld + 2 * t + 8);
}

// B fragment (16 x 8, k x n) whose element (k, n) is p[k * ld + n]: e.g. V read as (key, d) rows.
// The two k's of a register are in different rows: two 16-bit loads.
__device__ __forceinline__ void load_b_kn(uint32_t b[2], const uint16_t* p, int ld, int g, int t) {
  b[0] = pack16(p[(2 * t) * ld + g], p[(2 * t + 1) * ld + g]);
  b[1] = pack16(p[(2 * t + 8) * ld + g], p[(2 * t + 9) * ld + g]);
}

// The C fragments of two adjacent n8 tiles (16 x 16 together) as the A fragment of one k16 chunk.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = Mma<T>::pack(c0[0], c0[1]);  // row g,   cols 2t, 2t+1
  a[1] = Mma<T>::pack(c0[2], c0[3]);  // row g+8, cols 2t, 2t+1
  a[2] = Mma<T>::pack(c1[0], c1[1]);  // row g,   cols 8+2t, 9+2t
  a[3] = Mma<T>::pack(c1[2], c1[3]);  // row g+8, cols 8+2t, 9+2t
}

// Two 16-bit values in a word, each replaced by 0 where it is an inf or a nan.
template <typename T>
__device__ __forceinline__ uint32_t zero_nonfinite2(uint32_t x) {
  return x & ~__vcmpeq2(x & Mma<T>::kExp2, Mma<T>::kExp2);  // __vcmpeq2: 0xffff per equal half
}

// Rows row0 .. row0+ROWS-1 of a contiguous (n_rows, D) matrix into smem rows of D + kPad halves, as
// 16-byte vectors; rows past n_rows are zero-filled (a masked score times a garbage row would be NaN).
// With a type Finite (__half or __nv_bfloat16) every inf and nan is stored as 0 (the backward's masked
// tiles: dQ += dS K must not turn a masked dS = 0 and a non-finite key or value into 0 * nan).
template <int ROWS, int D, typename Finite = void>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* gmem, int64_t row0, int64_t n_rows) {
  constexpr int kVecPerRow = D / 8;
  for (int c = threadIdx.x; c < ROWS * kVecPerRow; c += kThreads) {
    const int r = c / kVecPerRow, col = (c % kVecPerRow) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < n_rows) val = *reinterpret_cast<const uint4*>(gmem + (row0 + r) * D + col);
    if constexpr (!std::is_void_v<Finite>) {
      val.x = zero_nonfinite2<Finite>(val.x);
      val.y = zero_nonfinite2<Finite>(val.y);
      val.z = zero_nonfinite2<Finite>(val.z);
      val.w = zero_nonfinite2<Finite>(val.w);
    }
    *reinterpret_cast<uint4*>(smem + r * (D + kPad) + col) = val;
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ------------------------------------------------------------------------------- launcher helpers

template <int D>
constexpr size_t fwd_smem() {
  return 2 * kBlockN * (D + kPad) * sizeof(uint16_t);
}
template <int D>
constexpr size_t dkdv_smem() {
  return (2 * kBlockN + 2 * bwd_block_m<D>()) * (D + kPad) * sizeof(uint16_t) + 2 * bwd_block_m<D>() * sizeof(float);
}
template <int D>
constexpr size_t dq_smem() {
  return (2 * kBlockM + 2 * kBlockN) * (D + kPad) * sizeof(uint16_t);
}

// The dynamic shared memory every launch asks for must fit the smallest opt-in limit among the archs
// built for: 163 KiB per block on sm_80 (A100; sm_90 allows 227 KiB).  ptxas cannot see dynamic shared
// memory, so it is checked here, at compile time; registers, spills and static shared memory are read
// from the built library by tests/test_cuda_resources.py.
constexpr size_t kMaxSmemOptinSm80 = 166912;
template <int D>
constexpr bool fits_sm80() {
  return fwd_smem<D>() <= kMaxSmemOptinSm80 && dkdv_smem<D>() <= kMaxSmemOptinSm80 && dq_smem<D>() <= kMaxSmemOptinSm80;
}
static_assert(fits_sm80<64>() && fits_sm80<128>(), "an attention kernel's dynamic shared memory exceeds sm_80's 163 KiB");

// More than 48 KiB of dynamic shared memory must be opted into, per kernel (sm_80: up to 163 KiB).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// The tile loads are 16-byte vectors: a tensor whose data does not start 16-byte aligned (a view with
// an odd storage offset) is copied.  (Rows are D * 2 = 128 or 256 bytes, so every row is then aligned.)
inline at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline const uint16_t* bits(const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); }
inline uint16_t* bits_mut(at::Tensor& t) { return static_cast<uint16_t*>(t.mutable_data_ptr()); }

inline void check_sizes(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(k.size(2) <= INT_MAX && q.size(0) * q.size(1) <= INT_MAX, "causal attention (CUDA): T must be < 2^31 "
              "and B*H < 2^31, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK((q.size(2) + kBlockM - 1) / kBlockM <= 65535 && (k.size(2) + kBlockN - 1) / kBlockN <= 65535,
              "causal attention (CUDA): at most 65535 tiles of 64 positions (T <= 4194240), got q ", q.sizes(),
              " and k ", k.sizes());
}

// Calls FN<T, D>(args...) for q's dtype (half / bfloat16) and head dim (64 / 128): 4 instantiations.
#define LLM_ATTN_DISPATCH(DTYPE, HEAD_DIM, FN, ...)                                                     \
  do {                                                                                                  \
    const bool is_half_ = (DTYPE) == at::kHalf;                                                         \
    if ((HEAD_DIM) == 64) {                                                                             \
      is_half_ ? FN<__half, 64>(__VA_ARGS__) : FN<__nv_bfloat16, 64>(__VA_ARGS__);                      \
    } else {                                                                                            \
      is_half_ ? FN<__half, 128>(__VA_ARGS__) : FN<__nv_bfloat16, 128>(__VA_ARGS__);                    \
    }                                                                                                   \
  } while (0)

inline void check_cuda_inputs(const char* op, const at::Tensor& q) {
  // ops.cpp checks these first, with the tensors described; repeated so a direct caller cannot slip past
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(attention_cuda_supports_head_dim(q.size(3)), op, ": the CUDA kernels support head dims 64 and 128, got ",
              q.size(3));
  // below sm_80 the kernels hold a __trap() instead of their mma.sync code (LLM_ATTN_SM80 above)
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, op, " needs compute capability 8.0+ (its kernels use mma.sync.m16n8k16 tensor-core "
              "instructions), got ", q.device(), " with ", major, ".", minor, "; use the torch or triton backend");
}

}  // namespace attn
}  // namespace llm_kernels

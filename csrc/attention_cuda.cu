// Causal FlashAttention-2 on the GPU: fp16/bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// Same math as attention_cpu.cpp (see there for the derivation): q (B, H, Tq, D), k/v (B, H_kv, Tk, D),
// contiguous, Tq <= Tk, bottom-right mask (query i sees key j iff j <= i + Tk - Tq), lse saved in fp32.
// Head dims D in {64, 128} (template instantiations); any Tq, Tk (tails are zero-filled and masked).
// Grouped-query attention: group = H / H_kv query heads share a k/v head; the block of the flat
// (batch, query head) index bh reads k/v slice bh / group (= b * H_kv + h / group), never a copy.
//
// Files: this one holds the forward kernel, its launcher and the registration in ops.cpp's table;
// attention_bwd_cuda.cu the backward kernels and launcher; attention_cuda.cuh the shared constants,
// the mma wrapper, fragment loaders and tile loads.  Kernels (4 warps = 128 threads each; tiles of 64
// keys; smem rows padded by 8 halves so the fragment loads are bank-conflict free):
// * _attn_fwd_kernel, grid (B*H, Tq/64): each warp owns 16 query rows; Q stays in registers as mma A
//   fragments; per key tile (only tiles some query of the block can see: causal block skipping) it
//   computes S = Q K^T (fp32), masks (only tiles that cross the diagonal or the tail), runs the online
//   softmax in the log2 domain on the accumulator registers (row max/sum over the 4 lanes that share a
//   row), repacks P as A fragments (the C layout of two n8 tiles is the A layout of one k16 chunk) and
//   accumulates O += P V.  Writes O and lse = ln2 * (m + log2 l).
// * _attn_bwd_delta_kernel: delta_i = rowsum(dO_i * O_i) in fp32, one warp per row.
// * _attn_bwd_dkdv_kernel, grid (B*H_kv, Tk/64): each warp owns 16 keys; K, V stay in smem; for each
//   of the group's query heads, for each step of BM queries that can see the tile: S^T = K Q^T,
//   P^T = exp2(S^T*scale*log2e - lse*log2e), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dK += dS^T Q (times scale on store): the group's sum stays in the same registers, no atomics.
// * _attn_bwd_dq_kernel, grid (B*H, Tq/64): each warp owns 16 queries; per visible key tile: S, P, dP,
//   dS = P (dP - delta), dQ += dS K (times scale on store).  No atomics: dQ, dK, dV are each written by
//   exactly one block, so the backward is deterministic (at the price of computing Q K^T twice).
// FLOPs: forward 4*T^2*D per (batch, head), halved by the mask; backward 2.5x that.  Memory: O(T*D).
//
// mma.m16n8k16 fragments (PTX ISA "Matrix Fragments for mma.m16n8k16"), lane = 4*g + t:
//   A (16x16): a0 = (row g, cols 2t, 2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n): b0 = (k = 2t, 2t+1; n = g), b1 = (k = 2t+8, 2t+9; n = g)
//   C (16x8): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// (the lower-indexed element in the low 16 bits of each 32-bit register).
//
// Limits: Tq, Tk < 2^31; per-(batch, head) base offsets are int64.  Inputs whose data pointer is not
// 16-byte aligned are copied (the tile loads are 16-byte vectors).
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h (cuBLAS headers; see layernorm_cuda.cu)
#include <c10/cuda/CUDAGuard.h>

#include "attention_cuda.cuh"

namespace llm_kernels {
namespace {

using namespace attn;

// ------------------------------------------------------------------------------------------ kernel

// grid (B*H, ceil(Tq / kBlockM)); smem: sK, sV (kBlockN x (D + kPad) halves each)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks<D>())
    _attn_fwd_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                     uint16_t* __restrict__ o, float* __restrict__ lse, int Tq, int Tk, int group,
                     float scale_log2) {
#if LLM_ATTN_SM80
  constexpr int LD = D + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;  // holds the Q tile first
  uint16_t* sV = smem + kBlockN * LD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int i0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;  // the longest (last) query tiles start first
  const int offset = Tk - Tq;
  q += bh * Tq * D;
  const int64_t bhk = blockIdx.x / static_cast<unsigned>(group);  // the k/v head it reads (GQA); 32-bit division
  k += bhk * Tk * D;
  v += bhk * Tk * D;
  o += bh * Tq * D;
  lse += bh * Tq;

  load_tile<kBlockM, D>(sK, q, i0, Tq);
  __syncthreads();
  uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments, for the whole loop
#pragma unroll
  for (int c = 0; c < D / 16; ++c) load_a(qf[c], sK + warp * 16 * LD + c * 16, LD, g, t);

  float acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of rows g and g+8
  float l[2] = {0.f, 0.f};              // running sum over this lane's columns only (quad-summed at the end)
  const int row0 = i0 + warp * 16 + g;  // this lane's rows: row0, row0 + 8
  const int last_key = min(Tk - 1, i0 + kBlockM - 1 + offset);
  const int n_tiles = last_key / kBlockN + 1;
  __shared__ int s_bad[kBlockN];  // masked tiles: key j's value row holds an inf or nan
  bool hit[2] = {false, false};   // rows g, g+8 see such a value inside a masked tile

  for (int kt = 0; kt < n_tiles; ++kt) {
    const int j0 = kt * kBlockN;
    __syncthreads();  // every warp is done with the previous tile (and with the Q tile in sK)
    load_tile<kBlockN, D>(sK, k, j0, Tk);
    load_tile<kBlockN, D>(sV, v, j0, Tk);
    // some (query, key) pair of this block is masked: the tile crosses the diagonal or the tail
    const bool need_mask = j0 + kBlockN - 1 > i0 + offset || j0 + kBlockN > Tk;
    if (need_mask) {  // a non-finite v_j must not reach the rows that do not see j as P * V = 0 * nan:
      for (int jj = threadIdx.x; jj < kBlockN; jj += kThreads) s_bad[jj] = 0;
      __syncthreads();  // zero it in shared memory, and flag key j (its viewers are set to NaN below)
      for (int idx = threadIdx.x; idx < kBlockN * D; idx += kThreads) {
        uint16_t& bits = sV[(idx / D) * LD + idx % D];
        if (Mma<T>::nonfinite(bits)) {
          bits = 0;
          s_bad[idx / D] = 1;
        }
      }
    }
    __syncthreads();

    float s[kBlockN / 8][4];  // S = Q K^T: 16 rows x 64 keys of this warp
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t b[2];
        load_b_nk(b, sK + nt * 8 * LD + c * 16, LD, g, t);
        Mma<T>::run(s[nt], qf[c], b);
      }
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        const int j = j0 + nt * 8 + 2 * t + (e & 1), i = row0 + (e >> 1) * 8;
        if (need_mask && (j >= Tk || j > i + offset)) {
          x = -INFINITY;
        } else if (need_mask && s_bad[j - j0]) {
          hit[e >> 1] = true;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row that has seen no key yet: keep exp2 finite
      alpha[r] = exp2f(m[r] - m_use[r]);              // 0 on a row's first visible tile (m = -inf)
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);  // P, unnormalized; masked entries -> 0
        l[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      acc[dn][0] *= alpha[0];
      acc[dn][1] *= alpha[0];
      acc[dn][2] *= alpha[1];
      acc[dn][3] *= alpha[1];
    }
    // O += P V: P (16 x 64 keys) as four k16 A fragments, V (64 keys x D) from smem
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pa[4];
      c_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t b[2];
        load_b_kn(b, sV + kk * 16 * LD + dn * 8, LD, g, t);
        Mma<T>::run(acc[dn], pa, b);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);  // > 0: every query sees key 0
    // a row that attends to a non-finite value is NaN, all of it (an inf in v would leave inf in
    // some columns only): any non-finite accumulator, or a flagged key seen in a masked tile
    bool bad = hit[r];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) bad |= !isfinite(acc[dn][2 * r]) || !isfinite(acc[dn][2 * r + 1]);
    bad |= __shfl_xor_sync(0xffffffffu, bad, 1);  // the quad of lanes that holds the row
    bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
    const int i = row0 + r * 8;
    if (i >= Tq) continue;
    const float inv = bad ? __int_as_float(0x7fc00000) : 1.f / l[r];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(o + static_cast<int64_t>(i) * D + dn * 8 + 2 * t) =
          Mma<T>::pack(acc[dn][2 * r] * inv, acc[dn][2 * r + 1] * inv);
    }
    if (t == 0) lse[i] = (m[r] + __log2f(l[r])) * kLn2;  // natural log: sum_j e^s = 2^m * l
  }
#else
  __trap();  // no mma.sync.m16n8k16 below sm_80; the launchers refuse such a GPU first
#endif
}

// ---------------------------------------------------------------------------------------- launcher

template <typename T, int D>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              double scale) {
  const int Tq = static_cast<int>(q.size(2)), Tk = static_cast<int>(k.size(2));
  const dim3 grid(static_cast<unsigned>(q.size(0) * q.size(1)), static_cast<unsigned>((Tq + kBlockM - 1) / kBlockM));
  auto kernel = _attn_fwd_kernel<T, D>;
  allow_smem(kernel, fwd_smem<D>());
  kernel<<<grid, kThreads, fwd_smem<D>(), c10::cuda::getCurrentCUDAStream()>>>(
      bits(q), bits(k), bits(v), bits_mut(out), lse.mutable_data_ptr<float>(), Tq, Tk,
      static_cast<int>(q.size(1) / k.size(1)), static_cast<float>(scale) * kLog2e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AttentionFwdOut attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                   double scale) {
  check_cuda_inputs("attention_fwd", q_in);
  check_sizes(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  LLM_ATTN_DISPATCH(q.scalar_type(), q.size(3), fwd_impl, q, k, v, out, lse, scale);
  return {out, lse};
}

namespace {

// Fill ops.cpp's table when the library loads (this file is compiled only in the CUDA build).
struct Registrar {
  Registrar() {
    cuda_kernels().attention_fwd = &attention_fwd_cuda;
    cuda_kernels().attention_bwd = &attention_bwd_cuda;
  }
};
const Registrar registrar;

}  // namespace
}  // namespace llm_kernels

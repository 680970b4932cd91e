// Causal FlashAttention-2 backward on the GPU (fp16/bf16 tensor cores, fp32 accumulation): the delta,
// dK/dV and dQ kernels described in attention_cuda.cu, and their launcher attention_bwd_cuda.
// Recomputes P = exp(S - lse) from the forward's lse; no atomics (each of dQ, dK, dV is written by
// exactly one block; a dK/dV block sums its kv head's whole group of query heads), so it is deterministic.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h (cuBLAS headers; see layernorm_cuda.cu)
#include <c10/cuda/CUDAGuard.h>

#include "attention_cuda.cuh"

namespace llm_kernels {
namespace {

using namespace attn;

// ------------------------------------------------------------------------------------------ kernels

// delta_i = rowsum(dO_i * O_i) in fp32; one warp per row of the (rows, D) matrices, 8 halves per lane.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _attn_bwd_delta_kernel(const uint16_t* __restrict__ o, const uint16_t* __restrict__ dout,
                           float* __restrict__ delta, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  float sum = 0.f;
  for (int col = lane * 8; col < D; col += 32 * 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + row * D + col);
    const uint4 dv = *reinterpret_cast<const uint4*>(dout + row * D + col);
    const uint16_t* oh = reinterpret_cast<const uint16_t*>(&ov);
    const uint16_t* dh = reinterpret_cast<const uint16_t*>(&dv);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += Mma<T>::to_float(oh[e]) * Mma<T>::to_float(dh[e]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[row] = sum;
}

// grid (B*H_kv, ceil(Tk / kBlockN)); smem: sK, sV (kBlockN rows), sQ, sdO (BM rows) of D + kPad halves,
// then lse*log2(e) and delta of the BM queries (fp32).  Query heads bhk*group .. bhk*group + group - 1
// read this block's k/v head: their contributions are summed in dk_acc, dv_acc, one head after another.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _attn_bwd_dkdv_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                          const uint16_t* __restrict__ v, const uint16_t* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, uint16_t* __restrict__ dk,
                          uint16_t* __restrict__ dv, int Tq, int Tk, int group, float scale, float scale_log2) {
#if LLM_ATTN_SM80
  constexpr int LD = D + kPad, BM = bwd_block_m<D>();
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;
  uint16_t* sV = sK + kBlockN * LD;
  uint16_t* sQ = sV + kBlockN * LD;
  uint16_t* sdO = sQ + BM * LD;
  float* sLse = reinterpret_cast<float*>(sdO + BM * LD);
  float* sDelta = sLse + BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bhk = blockIdx.x;       // (batch, kv head)
  const int j0 = blockIdx.y * kBlockN;  // the first key tiles see the most queries: they start first
  const int offset = Tk - Tq;
  q += bhk * group * Tq * D;  // the group's first query head; advanced by one head per group step
  dout += bhk * group * Tq * D;
  lse += bhk * group * Tq;
  delta += bhk * group * Tq;
  k += bhk * Tk * D;
  v += bhk * Tk * D;
  dk += bhk * Tk * D;
  dv += bhk * Tk * D;

  load_tile<kBlockN, D>(sK, k, j0, Tk);  // visible after the first step's __syncthreads
  load_tile<kBlockN, D>(sV, v, j0, Tk);
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[dn][e] = dv_acc[dn][e] = 0.f;
  }
  const int key0 = j0 + warp * 16 + g;  // this lane's keys: key0, key0 + 8
  const int first_q = max(0, j0 - offset);  // earlier queries see none of this tile

  // (query head of the group, step of BM queries) pairs, head after head: one loop, i0 wrapping back
  for (int gh = 0, i0 = first_q / BM * BM; gh < group;) {
    __syncthreads();  // every warp is done with the previous step's sQ, sdO, sLse, sDelta
    load_tile<BM, D>(sQ, q, i0, Tq);
    load_tile<BM, D>(sdO, dout, i0, Tq);
    for (int x = threadIdx.x; x < BM; x += kThreads) {
      const bool ok = i0 + x < Tq;
      sLse[x] = ok ? lse[i0 + x] * kLog2e : 0.f;
      sDelta[x] = ok ? delta[i0 + x] : 0.f;
    }
    __syncthreads();

    // S^T = K Q^T: this warp's 16 keys x BM queries
    float st[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t a[4];
      load_a(a, sK + warp * 16 * LD + c * 16, LD, g, t);
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
        uint32_t b[2];
        load_b_nk(b, sQ + nt * 8 * LD + c * 16, LD, g, t);
        Mma<T>::run(st[nt], a, b);
      }
    }
    // P^T = exp2(S^T * scale*log2e - lse_i*log2e), 0 where masked (past the diagonal or either tail)
    const bool need_mask = j0 + kBlockN - 1 > i0 + offset || i0 + BM > Tq || j0 + kBlockN > Tk;
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ic = nt * 8 + 2 * t + (e & 1), i = i0 + ic, j = key0 + (e >> 1) * 8;
        const float p = exp2f(st[nt][e] * scale_log2 - sLse[ic]);
        st[nt][e] = need_mask && (i >= Tq || j >= Tk || j > i + offset) ? 0.f : p;
      }
    }
    // dV += P^T dO: A = P^T (16 keys x k16 queries), B = dO rows (query, d)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4];
      c_to_a<T>(pa, st[2 * kk], st[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t b[2];
        load_b_kn(b, sdO + kk * 16 * LD + dn * 8, LD, g, t);
        Mma<T>::run(dv_acc[dn], pa, b);
      }
    }
    // dP^T = V dO^T
    float dpt[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t a[4];
      load_a(a, sV + warp * 16 * LD + c * 16, LD, g, t);
#pragma unroll
      for (int nt = 0; nt < BM / 8; ++nt) {
        uint32_t b[2];
        load_b_nk(b, sdO + nt * 8 * LD + c * 16, LD, g, t);
        Mma<T>::run(dpt[nt], a, b);
      }
    }
    // dS^T = P^T (dP^T - delta_i)
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - sDelta[nt * 8 + 2 * t + (e & 1)]);
    }
    // dK += dS^T Q: A = dS^T (16 keys x k16 queries), B = Q rows (query, d)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t da[4];
      c_to_a<T>(da, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t b[2];
        load_b_kn(b, sQ + kk * 16 * LD + dn * 8, LD, g, t);
        Mma<T>::run(dk_acc[dn], da, b);
      }
    }
    i0 += BM;
    if (i0 >= Tq) {  // the head's last step: on to the group's next query head
      i0 = first_q / BM * BM;
      ++gh;
      q += static_cast<int64_t>(Tq) * D;
      dout += static_cast<int64_t>(Tq) * D;
      lse += Tq;
      delta += Tq;
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + r * 8;
    if (j >= Tk) continue;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int64_t idx = static_cast<int64_t>(j) * D + dn * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk + idx) = Mma<T>::pack(dk_acc[dn][2 * r] * scale, dk_acc[dn][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + idx) = Mma<T>::pack(dv_acc[dn][2 * r], dv_acc[dn][2 * r + 1]);
    }
  }
#else
  __trap();  // no mma.sync.m16n8k16 below sm_80; the launchers refuse such a GPU first
#endif
}

// grid (B*H, ceil(Tq / kBlockM)); smem: sQ, sdO (kBlockM rows), sK, sV (kBlockN rows) of D + kPad halves
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    _attn_bwd_dq_kernel(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                        const uint16_t* __restrict__ dout, const float* __restrict__ lse,
                        const float* __restrict__ delta, uint16_t* __restrict__ dq, int Tq, int Tk, int group,
                        float scale, float scale_log2) {
#if LLM_ATTN_SM80
  constexpr int LD = D + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sdO = sQ + kBlockM * LD;
  uint16_t* sK = sdO + kBlockM * LD;
  uint16_t* sV = sK + kBlockN * LD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int i0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;  // the longest (last) query tiles start first
  const int offset = Tk - Tq;
  q += bh * Tq * D;
  dout += bh * Tq * D;
  dq += bh * Tq * D;
  const int64_t bhk = blockIdx.x / static_cast<unsigned>(group);  // the k/v head it reads (GQA); 32-bit division
  k += bhk * Tk * D;
  v += bhk * Tk * D;
  lse += bh * Tq;
  delta += bh * Tq;

  load_tile<kBlockM, D>(sQ, q, i0, Tq);  // visible after the first tile's __syncthreads
  load_tile<kBlockM, D>(sdO, dout, i0, Tq);
  const int row0 = i0 + warp * 16 + g;  // this lane's rows: row0, row0 + 8
  float lse2[2], drow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + r * 8;
    lse2[r] = i < Tq ? lse[i] * kLog2e : 0.f;
    drow[r] = i < Tq ? delta[i] : 0.f;
  }
  float dq_acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) dq_acc[dn][0] = dq_acc[dn][1] = dq_acc[dn][2] = dq_acc[dn][3] = 0.f;
  const int last_key = min(Tk - 1, i0 + kBlockM - 1 + offset);
  const int n_tiles = last_key / kBlockN + 1;

  for (int kt = 0; kt < n_tiles; ++kt) {
    const int j0 = kt * kBlockN;
    __syncthreads();  // every warp is done with the previous sK, sV
    if (j0 + kBlockN - 1 > i0 + offset || j0 + kBlockN > Tk) {  // a masked tile (need_mask below): its
      load_tile<kBlockN, D, T>(sK, k, j0, Tk);  // non-finite K, V entries are zeroed, or a key a
      load_tile<kBlockN, D, T>(sV, v, j0, Tk);  // query does not see would reach dQ as 0 * nan
    } else {
      load_tile<kBlockN, D>(sK, k, j0, Tk);
      load_tile<kBlockN, D>(sV, v, j0, Tk);
    }
    __syncthreads();

    // S = Q K^T, then P = exp2(S * scale*log2e - lse*log2e), 0 where masked
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t a[4];
      load_a(a, sQ + warp * 16 * LD + c * 16, LD, g, t);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t b[2];
        load_b_nk(b, sK + nt * 8 * LD + c * 16, LD, g, t);
        Mma<T>::run(s[nt], a, b);
      }
    }
    const bool need_mask = j0 + kBlockN - 1 > i0 + offset || j0 + kBlockN > Tk;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + nt * 8 + 2 * t + (e & 1), i = row0 + (e >> 1) * 8;
        const float p = exp2f(s[nt][e] * scale_log2 - lse2[e >> 1]);
        s[nt][e] = need_mask && (j >= Tk || j > i + offset) ? 0.f : p;
      }
    }
    // dP = dO V^T
    float dp[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
      uint32_t a[4];
      load_a(a, sdO + warp * 16 * LD + c * 16, LD, g, t);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t b[2];
        load_b_nk(b, sV + nt * 8 * LD + c * 16, LD, g, t);
        Mma<T>::run(dp[nt], a, b);
      }
    }
    // dS = P (dP - delta_i); dQ += dS K: A = dS (16 queries x k16 keys), B = K rows (key, d)
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      // masked tiles had their non-finite K and V zeroed above, so a masked P = 0 meets a finite dP here
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - drow[e >> 1]);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t da[4];
      c_to_a<T>(da, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        uint32_t b[2];
        load_b_kn(b, sK + kk * 16 * LD + dn * 8, LD, g, t);
        Mma<T>::run(dq_acc[dn], da, b);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + r * 8;
    if (i >= Tq) continue;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(dq + static_cast<int64_t>(i) * D + dn * 8 + 2 * t) =
          Mma<T>::pack(dq_acc[dn][2 * r] * scale, dq_acc[dn][2 * r + 1] * scale);
    }
  }
#else
  __trap();  // no mma.sync.m16n8k16 below sm_80; the launchers refuse such a GPU first
#endif
}

// ---------------------------------------------------------------------------------------- launcher

template <typename T, int D>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              double scale) {
  const int Tq = static_cast<int>(q.size(2)), Tk = static_cast<int>(k.size(2));
  const int64_t BH = q.size(0) * q.size(1), BHkv = k.size(0) * k.size(1);
  const int group = static_cast<int>(q.size(1) / k.size(1));  // query heads per k/v head
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float sc = static_cast<float>(scale), sc_log2 = sc * kLog2e;
  auto delta = at::empty({BH * Tq}, q.options().dtype(at::kFloat));

  const int64_t rows = BH * Tq;
  _attn_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      bits(out), bits(dout), delta.mutable_data_ptr<float>(), rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dkdv = _attn_bwd_dkdv_kernel<T, D>;
  allow_smem(dkdv, dkdv_smem<D>());
  const dim3 kgrid(static_cast<unsigned>(BHkv), static_cast<unsigned>((Tk + kBlockN - 1) / kBlockN));
  dkdv<<<kgrid, kThreads, dkdv_smem<D>(), stream>>>(bits(q), bits(k), bits(v), bits(dout), lse.const_data_ptr<float>(),
                                                    delta.const_data_ptr<float>(), bits_mut(dk), bits_mut(dv), Tq, Tk,
                                                    group, sc, sc_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dqk = _attn_bwd_dq_kernel<T, D>;
  allow_smem(dqk, dq_smem<D>());
  const dim3 qgrid(static_cast<unsigned>(BH), static_cast<unsigned>((Tq + kBlockM - 1) / kBlockM));
  dqk<<<qgrid, kThreads, dq_smem<D>(), stream>>>(bits(q), bits(k), bits(v), bits(dout), lse.const_data_ptr<float>(),
                                                 delta.const_data_ptr<float>(), bits_mut(dq), Tq, Tk, group, sc,
                                                 sc_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

AttentionBwdOut attention_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
                                   double scale) {
  check_cuda_inputs("attention_bwd", q_in);
  check_sizes(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dout = aligned16(dout_in), q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in),
             out = aligned16(out_in);
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  LLM_ATTN_DISPATCH(q.scalar_type(), q.size(3), bwd_impl, dout, q, k, v, out, lse, dq, dk, dv, scale);
  return {dq, dk, dv};
}

}  // namespace llm_kernels

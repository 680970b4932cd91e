// Causal attention on the CPU: the C++ twin of attention_cuda.cu -- the same blocked FlashAttention-2
// algorithm and the same saved log-sum-exp, in plain loops.  No (Tq, Tk) matrix ever exists.
//
// Shapes (contiguous, validated by ops.cpp): q (B, H, Tq, D); k, v (B, H_kv, Tk, D) with Tq <= Tk and
// H = group * H_kv.  The mask is aligned bottom-right: with offset = Tk - Tq, query i sees key j iff
// j <= i + offset.  Every query sees key 0, so no softmax row is ever empty.  s_ij = scale * q_i . k_j.
//
// Grouped-query attention: query head h reads k/v head h / group.  With bh = b * H + h the flat
// (batch, query head) index, its k/v slice is bh / group = b * H_kv + h / group (H is a multiple of
// group), so no k/v head is ever repeated in memory.
//
// Forward, one task per (batch*head, tile of kBlockQ queries): stream the key tiles 0 .. the last one
// the tile's last query can see (causal block skipping) through an online softmax -- running row max
// m, running sum l, unnormalized accumulator acc, all in acc_t:
//     m' = max(m, max_j s_ij);  l = l * exp(m - m') + sum_j exp(s_ij - m');  acc = acc * exp(m - m') + sum_j exp(s_ij - m') v_j
// then o_i = acc_i / l_i and lse_i = m_i + log(l_i) (saved, (B, H, Tq), for the backward).
//
// Backward (FlashAttention-2), recomputing P_ij = exp(s_ij - lse_i) tile by tile:
//     delta_i = rowsum(dO_i * O_i)               (equals sum_j P_ij dP_ij)
//     dP_ij = dO_i . v_j;   dS_ij = P_ij (dP_ij - delta_i)
//     dV_j = sum_i P_ij dO_i;   dK_j = scale sum_i dS_ij q_i;   dQ_i = scale sum_j dS_ij k_j
// dK/dV: one task per (batch*kv head, key tile), looping over the group's query heads and, for each,
// over the query tiles that can see the tile (dK_j, dV_j sum over every query of every head of the
// group); dQ: one task per (batch*head, query tile), looping over its visible key tiles (as
// attention_cuda.cu).  Each output element is written by exactly one task, summing in a fixed order:
// deterministic, no atomics, whatever the thread count.  Extra memory: the per-task tiles and delta
// (B*H*Tq), i.e. O(T).
//
// Accumulation in float for float/half/bfloat16 (inputs converted once per tile, one rounding on store)
// and in double for double; lse is float32 (float64 for double).  Any D >= 1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace llm_kernels {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per tile
constexpr int64_t kBlockK = 64;  // keys per tile

struct Dims {
  int64_t BH, Tq, Tk, D;
  int64_t group;  // query heads per k/v head: H / H_kv (1 without GQA)
  int64_t offset() const { return Tk - Tq; }
  int64_t BHkv() const { return BH / group; }
};

// rows x D elements of a contiguous matrix, converted to the accumulation type
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t rows, int64_t D, acc_t* dst) {
  for (int64_t e = 0; e < rows * D; ++e) dst[e] = static_cast<acc_t>(src[e]);
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename acc_t>
void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// How many keys of the tile starting at j0 (n keys long) query i can see: j0 .. min(j0 + n, i + offset + 1).
int64_t visible(int64_t i, int64_t j0, int64_t n, int64_t offset) {
  return std::clamp<int64_t>(i + offset + 1 - j0, 0, n);
}

template <typename scalar_t>
void fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* o, void* lse_v, Dims dm,
                double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* lse = static_cast<acc_t*>(lse_v);
  const int64_t D = dm.D, offset = dm.offset();
  const int64_t n_qtiles = (dm.Tq + kBlockQ - 1) / kBlockQ;
  const acc_t scale = static_cast<acc_t>(scale_d);
  at::parallel_for(0, dm.BH * n_qtiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockQ * D), kt(kBlockK * D), vt(kBlockK * D), acc(kBlockQ * D), s(kBlockK);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qtiles, i0 = (task % n_qtiles) * kBlockQ;
      const int64_t bhk = bh / dm.group;  // the k/v slice this query head reads
      const int64_t mq = std::min(kBlockQ, dm.Tq - i0);
      load_tile(q + (bh * dm.Tq + i0) * D, mq, D, qt.data());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      const int64_t last_key = i0 + mq - 1 + offset;  // the tile's last query sees keys 0..last_key (< Tk)
      for (int64_t j0 = 0; j0 <= last_key; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, dm.Tk - j0);
        load_tile(k + (bhk * dm.Tk + j0) * D, nk, D, kt.data());
        load_tile(v + (bhk * dm.Tk + j0) * D, nk, D, vt.data());
        for (int64_t r = 0; r < mq; ++r) {
          const int64_t nv = visible(i0 + r, j0, nk, offset);
          if (nv == 0) continue;  // this row sees none of the tile: it changes nothing
          const acc_t* qr = qt.data() + r * D;
          acc_t* accr = acc.data() + r * D;
          acc_t row_max = -std::numeric_limits<acc_t>::infinity();
          for (int64_t c = 0; c < nv; ++c) {
            s[c] = scale * dot(qr, kt.data() + c * D, D);
            row_max = std::max(row_max, s[c]);
          }
          const acc_t m_new = std::max(m[r], row_max);
          const acc_t alpha = std::exp(m[r] - m_new);  // 0 on the first visible tile (m = -inf)
          l[r] *= alpha;
          for (int64_t d = 0; d < D; ++d) accr[d] *= alpha;
          for (int64_t c = 0; c < nv; ++c) {
            const acc_t p = std::exp(s[c] - m_new);
            l[r] += p;
            axpy(p, vt.data() + c * D, accr, D);
          }
          m[r] = m_new;
        }
      }
      for (int64_t r = 0; r < mq; ++r) {
        // a row that attends to a non-finite value is NaN, all of it (an inf in v would leave inf in
        // some columns only); masked keys were never read, so the future cannot reach it
        const bool bad = std::any_of(acc.begin() + r * D, acc.begin() + (r + 1) * D,
                                     [](acc_t a) { return !std::isfinite(a); });
        const acc_t inv = bad ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1) / l[r];
        scalar_t* orow = o + (bh * dm.Tq + i0 + r) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
        lse[bh * dm.Tq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* o,
                const void* lse_v, scalar_t* dq, scalar_t* dk, scalar_t* dv, Dims dm, double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* lse = static_cast<const acc_t*>(lse_v);
  const int64_t D = dm.D, offset = dm.offset();
  const acc_t scale = static_cast<acc_t>(scale_d);

  // 1. delta_i = rowsum(dO_i * O_i), (B*H*Tq,)
  std::vector<acc_t> delta(static_cast<size_t>(dm.BH * dm.Tq));
  at::parallel_for(0, dm.BH * dm.Tq, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d)
        sum += static_cast<acc_t>(dout[row * D + d]) * static_cast<acc_t>(o[row * D + d]);
      delta[row] = sum;
    }
  });

  // 2. dK, dV: one task per (batch*kv head, key tile), summing over the group's query heads
  const int64_t n_ktiles = (dm.Tk + kBlockK - 1) / kBlockK;
  at::parallel_for(0, dm.BHkv() * n_ktiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kt(kBlockK * D), vt(kBlockK * D), qt(kBlockQ * D), dot_t(kBlockQ * D);
    std::vector<acc_t> dk_acc(kBlockK * D), dv_acc(kBlockK * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / n_ktiles, j0 = (task % n_ktiles) * kBlockK;
      const int64_t nk = std::min(kBlockK, dm.Tk - j0);
      load_tile(k + (bhk * dm.Tk + j0) * D, nk, D, kt.data());
      load_tile(v + (bhk * dm.Tk + j0) * D, nk, D, vt.data());
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      // queries before j0 - offset see none of this tile (causal block skipping)
      const int64_t first_q = std::max<int64_t>(0, j0 - offset);
      for (int64_t bh = bhk * dm.group; bh < (bhk + 1) * dm.group; ++bh) {  // the group's query heads
        for (int64_t i0 = first_q / kBlockQ * kBlockQ; i0 < dm.Tq; i0 += kBlockQ) {
          const int64_t mq = std::min(kBlockQ, dm.Tq - i0);
          load_tile(q + (bh * dm.Tq + i0) * D, mq, D, qt.data());
          load_tile(dout + (bh * dm.Tq + i0) * D, mq, D, dot_t.data());
          for (int64_t r = 0; r < mq; ++r) {
            const int64_t i = i0 + r, nv = visible(i, j0, nk, offset);
            const acc_t lse_i = lse[bh * dm.Tq + i], delta_i = delta[bh * dm.Tq + i];
            const acc_t* qr = qt.data() + r * D;
            const acc_t* dor = dot_t.data() + r * D;
            for (int64_t c = 0; c < nv; ++c) {
              const acc_t p = std::exp(scale * dot(qr, kt.data() + c * D, D) - lse_i);
              const acc_t ds = p * (dot(dor, vt.data() + c * D, D) - delta_i);
              axpy(p, dor, dv_acc.data() + c * D, D);
              axpy(ds, qr, dk_acc.data() + c * D, D);
            }
          }
        }
      }
      scalar_t* dkr = dk + (bhk * dm.Tk + j0) * D;
      scalar_t* dvr = dv + (bhk * dm.Tk + j0) * D;
      for (int64_t e = 0; e < nk * D; ++e) {
        dkr[e] = static_cast<scalar_t>(scale * dk_acc[e]);
        dvr[e] = static_cast<scalar_t>(dv_acc[e]);
      }
    }
  });

  // 3. dQ: one task per (batch*head, query tile)
  const int64_t n_qtiles = (dm.Tq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, dm.BH * n_qtiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qt(kBlockQ * D), dot_t(kBlockQ * D), kt(kBlockK * D), vt(kBlockK * D), dq_acc(kBlockQ * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qtiles, i0 = (task % n_qtiles) * kBlockQ;
      const int64_t bhk = bh / dm.group;  // the k/v slice this query head reads
      const int64_t mq = std::min(kBlockQ, dm.Tq - i0);
      load_tile(q + (bh * dm.Tq + i0) * D, mq, D, qt.data());
      load_tile(dout + (bh * dm.Tq + i0) * D, mq, D, dot_t.data());
      std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
      const int64_t last_key = i0 + mq - 1 + offset;
      for (int64_t j0 = 0; j0 <= last_key; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, dm.Tk - j0);
        load_tile(k + (bhk * dm.Tk + j0) * D, nk, D, kt.data());
        load_tile(v + (bhk * dm.Tk + j0) * D, nk, D, vt.data());
        for (int64_t r = 0; r < mq; ++r) {
          const int64_t i = i0 + r, nv = visible(i, j0, nk, offset);
          const acc_t lse_i = lse[bh * dm.Tq + i], delta_i = delta[bh * dm.Tq + i];
          const acc_t* qr = qt.data() + r * D;
          const acc_t* dor = dot_t.data() + r * D;
          for (int64_t c = 0; c < nv; ++c) {
            const acc_t p = std::exp(scale * dot(qr, kt.data() + c * D, D) - lse_i);
            const acc_t ds = p * (dot(dor, vt.data() + c * D, D) - delta_i);
            axpy(ds, kt.data() + c * D, dq_acc.data() + r * D, D);
          }
        }
      }
      scalar_t* dqr = dq + (bh * dm.Tq + i0) * D;
      for (int64_t e = 0; e < mq * D; ++e) dqr[e] = static_cast<scalar_t>(scale * dq_acc[e]);
    }
  });
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3), q.size(1) / k.size(1)};
}

}  // namespace

AttentionFwdOut attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(stats_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), lse.data_ptr(), dims_of(q, k), scale);
  });
  return {out, lse};
}

AttentionBwdOut attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                         v.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), lse.const_data_ptr(),
                         dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                         dv.mutable_data_ptr<scalar_t>(), dims_of(q, k), scale);
  });
  return {dq, dk, dv};
}

}  // namespace llm_kernels

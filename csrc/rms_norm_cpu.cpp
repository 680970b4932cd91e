// RMSNorm on the CPU: the C++ twin of rms_norm_cuda.cu (and of kernels/fused_rmsnorm.py), same
// algorithm, same saved statistic.
//
// Forward, per row of x (M, C):  rstd = 1/sqrt(mean(x^2) + eps),  y = x * rstd * w;  saves rstd (M,).
// mean(x^2) is taken of the row scaled by 2^-k, 2^k a power of two near max(max|x|, sqrt(eps)) (from
// frexp): the scaling is exact, the scaled entries stay below 1 in magnitude, so their squares neither
// overflow (x near 1e20: x^2 is inf in fp32) nor underflow (x near 1e-20), and
// rstd = 2^-k / sqrt(mean((x 2^-k)^2) + eps 4^-k) with eps 4^-k <= 1 (the floor sqrt(eps) keeps it
// finite for tiny rows, whose entries far below sqrt(eps) count for nothing next to eps; an all-zero
// row needs no special case).  add_rms_norm runs the same forward on s = x + residual: the first pass
// forms s in fp32 (fp64), stores it rounded to x's dtype, and the later passes read that stored s
// (exactly what kernels.reference.add_rms_norm normalizes).
//
// Backward (the VJP), with xhat = x * rstd and g = dy * w:
//   dx = rstd * (g - xhat * mean(g * xhat)) (+ dsum, the sum's own incoming gradient, for add_rms_norm)
//   dw = sum over rows of dy * xhat   (column sums)
// The column sums are split into at most kMaxBlocks row blocks that each accumulate a partial (C,)
// row in fp32 (fp64 for double), then one pass adds the partials in block order: no atomics, and the
// result does not depend on the thread count.
//
// weight may be in x's dtype or float32 (w_t); dweight comes back in weight's dtype.  Accumulation is
// in float for float/half/bfloat16 and in double for double; one rounding on store.  Rows run in
// parallel (at::parallel_for); the inner loops are plain contiguous loops over 8 independent lanes
// (added pairwise at the end) that the compiler vectorizes at -O3.  The forward reads each row three
// times (max, squares, y), the backward reads x, dy and w twice per row; a row (C * 4 bytes) stays in
// L1/L2 between the passes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "rms_norm.h"

namespace llm_kernels {
namespace {

constexpr int64_t kMaxBlocks = 64;  // row blocks for the dweight partial sums

// sum_{c < C} term(c) over 8 independent lanes, added pairwise (and vectorizable).
template <typename acc_t, typename Term>
acc_t lane_sum(int64_t C, const Term& term) {
  acc_t lane[8] = {};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += term(c + l);
  }
  acc_t tail = 0;
  for (; c < C; ++c) tail += term(c);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

// max_{c < C} |x_c| over 8 lanes.  NaNs compare false and are passed over; they still reach the sum of
// squares (and so rstd and the whole row), as in the reference.
template <typename acc_t, typename scalar_t>
acc_t abs_max(const scalar_t* x, int64_t C) {
  acc_t lane[8] = {};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int l = 0; l < 8; ++l) {
      const acc_t v = std::abs(static_cast<acc_t>(x[c + l]));
      lane[l] = v > lane[l] ? v : lane[l];
    }
  }
  acc_t m = 0;
  for (; c < C; ++c) {
    const acc_t v = std::abs(static_cast<acc_t>(x[c]));
    m = v > m ? v : m;
  }
  for (int l = 0; l < 8; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

// 2^-k (exact) with max(amax, sqrt(eps)) = f * 2^k, f in [0.5, 1); k clamped so that 2^-k is a normal
// number (a huge or non-finite amax gives scaled entries a little above 1, or NaN: still no overflow).
template <typename acc_t>
acc_t inv_pow2_scale(acc_t amax, acc_t eps) {
  const acc_t ref = std::max(amax, std::sqrt(eps));
  int k = 0;
  std::frexp(ref, &k);
  constexpr int lo = 1 - std::numeric_limits<acc_t>::max_exponent;  // 2^-k <= the largest power of two
  constexpr int hi = 1 - std::numeric_limits<acc_t>::min_exponent;  // 2^-k >= the smallest normal
  return std::ldexp(acc_t(1), -std::clamp(k, lo, hi));
}

// res == nullptr: RMSNorm of x.  Otherwise RMSNorm of s = x + res, written to s_out.
template <typename scalar_t, typename w_t>
void fwd_kernel(const scalar_t* x, const scalar_t* res, scalar_t* s_out, const w_t* w, scalar_t* y, void* rstd_v,
                int64_t M, int64_t C, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* rstd_out = static_cast<acc_t*>(rstd_v);
  const acc_t feps = static_cast<acc_t>(eps);
  const int64_t grain = std::max<int64_t>(1, 8192 / C);  // enough rows per task that a task moves ~32 KiB
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      if (res != nullptr) {
        const scalar_t* rr = res + r * C;
        scalar_t* sr = s_out + r * C;
        for (int64_t c = 0; c < C; ++c) {
          sr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) + static_cast<acc_t>(rr[c]));
        }
        xr = sr;  // the statistic and y are those of the stored (rounded) sum
      }
      const acc_t inv = inv_pow2_scale<acc_t>(abs_max<acc_t>(xr, C), feps);
      const acc_t ssq = lane_sum<acc_t>(C, [&](int64_t c) {
        const acc_t v = static_cast<acc_t>(xr[c]) * inv;
        return v * v;
      });
      const acc_t rstd = inv / std::sqrt(ssq / static_cast<acc_t>(C) + feps * inv * inv);
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) * rstd * static_cast<acc_t>(w[c]));
      }
      rstd_out[r] = rstd;
    }
  });
}

template <typename scalar_t, typename w_t>
void bwd_kernel(const scalar_t* dy, const scalar_t* x, const w_t* w, const void* rstd_v, const scalar_t* dsum,
                scalar_t* dx, w_t* dw, int64_t M, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* rstd_in = static_cast<const acc_t*>(rstd_v);
  const int64_t n_blocks = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, M));
  const int64_t rows_per_block = M == 0 ? 0 : (M + n_blocks - 1) / n_blocks;
  std::vector<acc_t> partial(static_cast<size_t>(n_blocks * C), acc_t(0));  // (n_blocks, C) dw partials
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      acc_t* pdw = partial.data() + blk * C;
      const int64_t r_end = std::min(M, (blk + 1) * rows_per_block);
      for (int64_t r = blk * rows_per_block; r < r_end; ++r) {
        const scalar_t* xr = x + r * C;
        const scalar_t* dyr = dy + r * C;
        const acc_t rstd = rstd_in[r];
        const acc_t sum_gx = lane_sum<acc_t>(C, [&](int64_t c) {
          return static_cast<acc_t>(dyr[c]) * static_cast<acc_t>(w[c]) * static_cast<acc_t>(xr[c]);
        });
        const acc_t c1 = sum_gx * rstd / static_cast<acc_t>(C);  // mean(g * xhat)
        scalar_t* dxr = dx + r * C;
        const scalar_t* dsr = dsum != nullptr ? dsum + r * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(dyr[c]);
          const acc_t xhat = static_cast<acc_t>(xr[c]) * rstd;
          pdw[c] += d * xhat;
          acc_t out = (d * static_cast<acc_t>(w[c]) - xhat * c1) * rstd;
          if (dsr != nullptr) out += static_cast<acc_t>(dsr[c]);
          dxr[c] = static_cast<scalar_t>(out);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {  // reduce the partials, in block order
    acc_t s = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) s += partial[blk * C + c];
    dw[c] = static_cast<w_t>(s);
  }
}

// Runs body.template operator()<w_t>() with w_t the C++ type of weight: x's scalar_t, or float.
template <typename scalar_t, typename Body>
void with_weight_type(const at::Tensor& weight, const Body& body) {
  if (weight.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    body.template operator()<scalar_t>();
  } else {
    body.template operator()<float>();
  }
}

}  // namespace

RmsNormFwdOut rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  auto y = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_fwd_cpu", [&] {
    with_weight_type<scalar_t>(weight, [&]<typename w_t>() {
      fwd_kernel<scalar_t, w_t>(x.const_data_ptr<scalar_t>(), nullptr, nullptr, weight.const_data_ptr<w_t>(),
                                y.mutable_data_ptr<scalar_t>(), rstd.data_ptr(), M, C, eps);
    });
  });
  return {y, rstd};
}

AddRmsNormFwdOut add_rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                      double eps) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  auto y = at::empty_like(x);
  auto sum = at::empty_like(x);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm_fwd_cpu", [&] {
    with_weight_type<scalar_t>(weight, [&]<typename w_t>() {
      fwd_kernel<scalar_t, w_t>(x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                                sum.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<w_t>(),
                                y.mutable_data_ptr<scalar_t>(), rstd.data_ptr(), M, C, eps);
    });
  });
  return {y, sum, rstd};
}

RmsNormBwdOut rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& rstd, const at::Tensor& dsum) {
  const int64_t C = x.size(-1), M = x.numel() / C;
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_bwd_cpu", [&] {
    with_weight_type<scalar_t>(weight, [&]<typename w_t>() {
      bwd_kernel<scalar_t, w_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                weight.const_data_ptr<w_t>(), rstd.const_data_ptr(),
                                dsum.defined() ? dsum.const_data_ptr<scalar_t>() : nullptr,
                                dx.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<w_t>(), M, C);
    });
  });
  return {dx, dw};
}

}  // namespace llm_kernels

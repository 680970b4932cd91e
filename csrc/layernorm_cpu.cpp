// LayerNorm on the CPU: the C++ twin of layernorm_cuda.cu, same algorithm, same saved statistics.
//
// add_layer_norm (the pre-LN block's residual add) runs the same forward on s = x + residual: the
// first pass reads x and residual once, forms s in fp32 (fp64) and stores it rounded to x's dtype,
// and the later passes read that stored s (exactly what kernels.reference.add_layer_norm
// normalizes).  Its backward is layer_norm_bwd on s (the Python autograd formula adds dsum).
//
// Forward, per row of x (M, C):  mean = K + sum(x - K)/C with K = x[0];  var = sum((x - mean)^2)/C
// (two passes: no catastrophic cancellation for rows with a large mean);  rstd = 1/sqrt(var + eps);
// y = (x - mean) * rstd * w + b.  Saves mean and rstd (M,) for the backward.  Shifting by the row's
// first element makes a constant row's mean exact (it normalizes to exactly 0, not to rounding noise
// times 1/sqrt(eps)) and keeps the summands small for rows like 1e4 + noise; the sums run over 8
// independent lanes, added pairwise at the end (error ~C/8 ulp instead of ~C ulp for one running sum).
//
// Backward (the VJP), with xhat = (x - mean) * rstd and g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          per row
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy   (column sums)
// The column sums are split into at most kMaxBlocks row blocks that each accumulate a partial (C,)
// row in fp32 (fp64 for double), then one pass adds the partials: no atomics, and the result does
// not depend on the thread count.
//
// Accumulation is in float for float/half/bfloat16 and in double for double; one rounding on store.
// Rows run in parallel (at::parallel_for); the inner loops are plain contiguous loops the compiler
// vectorizes at -O3.  The forward reads each row three times (sum, squares, y) and writes y once;
// rows are small enough (C * 4 bytes) to stay in L1/L2 between the passes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace llm_kernels {
namespace {

constexpr int64_t kMaxBlocks = 64;  // row blocks for the dweight/dbias partial sums

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

// res == nullptr: LayerNorm of x.  Otherwise LayerNorm of s = x + res, written to s_out.
template <typename scalar_t>
void fwd_kernel(const scalar_t* x, const scalar_t* res, scalar_t* s_out, const scalar_t* w, const scalar_t* b,
                scalar_t* y, void* mean_v, void* rstd_v, int64_t M, int64_t C, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* mean_out = static_cast<acc_t*>(mean_v);
  auto* rstd_out = static_cast<acc_t*>(rstd_v);
  // enough rows per task that a task moves ~32 KiB
  const int64_t grain = std::max<int64_t>(1, 8192 / C);
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
        xr = sr;  // the statistics and y are those of the stored (rounded) sum
      }
      const acc_t shift = C > 0 ? static_cast<acc_t>(xr[0]) : acc_t(0);
      const acc_t mean = shift + lane_sum<acc_t>(C, [&](int64_t c) { return static_cast<acc_t>(xr[c]) - shift; }) /
                                     static_cast<acc_t>(C);
      const acc_t sq = lane_sum<acc_t>(C, [&](int64_t c) {
        const acc_t d = static_cast<acc_t>(xr[c]) - mean;
        return d * d;
      });
      const acc_t rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
        yr[c] = static_cast<scalar_t>(xhat * static_cast<acc_t>(w[c]) + static_cast<acc_t>(b[c]));
      }
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const void* mean_v, const void* rstd_v,
                scalar_t* dx, scalar_t* dw, scalar_t* db, int64_t M, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* mean_in = static_cast<const acc_t*>(mean_v);
  const auto* rstd_in = static_cast<const acc_t*>(rstd_v);
  const int64_t n_blocks = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, M));
  const int64_t rows_per_block = M == 0 ? 0 : (M + n_blocks - 1) / n_blocks;
  // partials: (n_blocks, 2, C) -- per block, the dw row then the db row
  std::vector<acc_t> partial(static_cast<size_t>(n_blocks * 2 * C), acc_t(0));
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    std::vector<acc_t> g(static_cast<size_t>(C));
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      acc_t* pdw = partial.data() + blk * 2 * C;
      acc_t* pdb = pdw + C;
      const int64_t r_end = std::min(M, (blk + 1) * rows_per_block);
      for (int64_t r = blk * rows_per_block; r < r_end; ++r) {
        const scalar_t* xr = x + r * C;
        const scalar_t* dyr = dy + r * C;
        const acc_t mean = mean_in[r], rstd = rstd_in[r];
        acc_t sum_g = 0, sum_gx = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(dyr[c]);
          const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
          const acc_t gc = d * static_cast<acc_t>(w[c]);
          g[c] = gc;
          sum_g += gc;
          sum_gx += gc * xhat;
          pdw[c] += d * xhat;
          pdb[c] += d;
        }
        const acc_t c1 = sum_gx / static_cast<acc_t>(C), c2 = sum_g / static_cast<acc_t>(C);
        scalar_t* dxr = dx + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xhat = (static_cast<acc_t>(xr[c]) - mean) * rstd;
          dxr[c] = static_cast<scalar_t>((g[c] - c2 - xhat * c1) * rstd);
        }
      }
    }
  });
  // reduce the partials, in block order
  for (int64_t c = 0; c < C; ++c) {
    acc_t sdw = 0, sdb = 0;
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      sdw += partial[blk * 2 * C + c];
      sdb += partial[blk * 2 * C + C + c];
    }
    dw[c] = static_cast<scalar_t>(sdw);
    db[c] = static_cast<scalar_t>(sdb);
  }
}

}  // namespace

LayerNormFwdOut layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   double eps) {
  const int64_t M = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  auto mean = at::empty({M}, stats_opts);
  auto rstd = at::empty({M}, stats_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, nullptr, weight.const_data_ptr<scalar_t>(),
                         bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean.data_ptr(),
                         rstd.data_ptr(), M, C, eps);
  });
  return {y, mean, rstd};
}

AddLayerNormFwdOut add_layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                          const at::Tensor& bias, double eps) {
  const int64_t M = x.size(0), C = x.size(1);
  auto y = at::empty_like(x);
  auto sum = at::empty_like(x);
  auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  auto mean = at::empty({M}, stats_opts);
  auto rstd = at::empty({M}, stats_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                         sum.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                         bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mean.data_ptr(),
                         rstd.data_ptr(), M, C, eps);
  });
  return {y, sum, mean, rstd};
}

LayerNormBwdOut layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t M = x.size(0), C = x.size(1);
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(weight);
  auto db = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                         weight.const_data_ptr<scalar_t>(), mean.const_data_ptr(), rstd.const_data_ptr(),
                         dx.mutable_data_ptr<scalar_t>(), dw.mutable_data_ptr<scalar_t>(),
                         db.mutable_data_ptr<scalar_t>(), M, C);
  });
  return {dx, dw, db};
}

}  // namespace llm_kernels

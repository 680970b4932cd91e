// Softmax cross-entropy on the CPU: the C++ twin of cross_entropy_cuda.cu, same algorithm, same outputs.
//
// Math, for one row of logits z (V,) with target y:  lse = log(sum_j exp(z_j)),  loss = lse - z_y,
//   d loss / d z = softmax(z) - onehot(y) = exp(z - lse) - onehot(y).
// The op's loss is the mean over the n_valid rows whose target is not ignore_index (0 when none are
// valid), so backward scales each valid row by dloss / max(n_valid, 1) and writes zero rows for the
// ignored targets.
//
// Forward: one pass per row with the online max/sum: a running max m and a running sum s of
// exp(z - m), rescaled by exp(m_old - m_new) whenever m grows, so each logit is read once and exp()
// never overflows; lse = m + log(s).  Saves lse (N,) for the backward, which reads each row once and
// writes dlogits once.  The per-row losses go to a buffer and are summed in row order afterwards
// (deterministic whatever the thread count).
//
// Accumulation is in float for float/half/bfloat16 and in double for double; one rounding on store.
// Rows run in parallel (at::parallel_for).  Targets are validated by ops.cpp before these run.
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

template <typename scalar_t>
void ce_fwd_kernel(const scalar_t* z, const int64_t* y, void* lse_v, std::vector<double>& row_loss, int64_t N,
                   int64_t V, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* lse_out = static_cast<acc_t*>(lse_v);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);  // rows per task: ~32K logits
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* zr = z + r * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t s = 0;
      for (int64_t c = 0; c < V; ++c) {
        const acc_t v = static_cast<acc_t>(zr[c]);
        if (v > m) {  // a new max: rescale the sum so far (exp(-inf) = 0 on the first element)
          s = s * std::exp(m - v) + acc_t(1);
          m = v;
        } else if (v != -std::numeric_limits<acc_t>::infinity()) {  // -inf adds 0 (and -inf - -inf is nan)
          s += std::exp(v - m);  // a nan logit makes s nan, as in the reference
        }
      }
      const acc_t lse = m + std::log(s);
      lse_out[r] = lse;
      row_loss[r] = y[r] == ignore_index ? 0.0 : static_cast<double>(lse - static_cast<acc_t>(zr[y[r]]));
    }
  });
}

template <typename scalar_t>
void ce_bwd_kernel(const scalar_t* z, const int64_t* y, const void* lse_v, double scale, scalar_t* g, int64_t N,
                   int64_t V, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* lse_in = static_cast<const acc_t*>(lse_v);
  const acc_t sc = static_cast<acc_t>(scale);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gr = g + r * V;
      if (y[r] == ignore_index) {
        std::fill(gr, gr + V, static_cast<scalar_t>(0));
        continue;
      }
      const scalar_t* zr = z + r * V;
      const acc_t lse = lse_in[r];
      for (int64_t c = 0; c < V; ++c) gr[c] = static_cast<scalar_t>(std::exp(static_cast<acc_t>(zr[c]) - lse) * sc);
      gr[y[r]] = static_cast<scalar_t>((std::exp(static_cast<acc_t>(zr[y[r]]) - lse) - acc_t(1)) * sc);
    }
  });
}

}  // namespace

CrossEntropyFwdOut cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(stats_dtype(logits.scalar_type()));
  auto lse = at::empty({N}, opts);
  std::vector<double> row_loss(static_cast<size_t>(N));
  const int64_t* y = targets.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    ce_fwd_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), y, lse.data_ptr(), row_loss, N, V, ignore_index);
  });
  // the mean over valid rows, summed in row order in double: deterministic, and exact enough for any N
  double total = 0;
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) {
    total += row_loss[r];
    n_valid += y[r] != ignore_index;
  }
  auto loss = at::full({}, total / static_cast<double>(std::max<int64_t>(n_valid, 1)), opts);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& lse, int64_t ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  auto dlogits = at::empty_like(logits);
  const int64_t* y = targets.const_data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) n_valid += y[r] != ignore_index;
  const double scale = dloss.item<double>() / static_cast<double>(std::max<int64_t>(n_valid, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    ce_bwd_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), y, lse.const_data_ptr(), scale,
                            dlogits.mutable_data_ptr<scalar_t>(), N, V, ignore_index);
  });
  return dlogits;
}

}  // namespace llm_kernels

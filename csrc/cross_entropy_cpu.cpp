// Softmax cross-entropy on the CPU: the C++ twin of cross_entropy_cuda.cu, same algorithm, same outputs.
//
// Math, for one row of logits z (V,) with target y, m = max(z) and s = sum_j exp(z_j - m):
//   loss = log(s) - (z_y - m),   d loss / d z = softmax(z) - onehot(y) = exp((z - m) - log(s)) - onehot(y).
// log(s) and z - m stay apart, as in PyTorch's log_softmax: folding them into lse = m + log(s) first
// would round lse to the precision of m, an error of ulp(max |z|) in the loss and every probability.
// The op's loss is the mean over the n_valid rows whose target is not ignore_index (0 when none are
// valid), so backward scales each valid row by dloss / max(n_valid, 1) and writes zero rows for the
// ignored targets.
//
// Forward: one pass per row with the online max/sum: a running max m and a running sum s of
// exp(z - m), rescaled by exp(m_old - m_new) whenever m grows, so each logit is read once and exp()
// never overflows.  Saves stats (N, 2) = (m, log s) for the backward, which reads each row once and
// writes dlogits once.  The per-row losses go to a buffer and are summed in row order afterwards
// (deterministic whatever the thread count).  A NaN or +inf logit makes the row's loss and gradient
// NaN (+inf - +inf), as in the reference.
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
void ce_fwd_kernel(const scalar_t* z, const int64_t* y, void* stats_v, std::vector<double>& row_loss, int64_t N,
                   int64_t V, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* stats = static_cast<acc_t*>(stats_v);  // (N, 2): m, log s
  const int64_t grain = std::max<int64_t>(1, 32768 / V);  // rows per task: ~32K logits
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* zr = z + r * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      acc_t s = 0;
      bool nan = false;
      for (int64_t c = 0; c < V; ++c) {
        const acc_t v = static_cast<acc_t>(zr[c]);
        if (std::isnan(v) || v == std::numeric_limits<acc_t>::infinity()) {
          nan = true;  // log-softmax of the row is NaN (+inf - +inf)
        } else if (v > m) {  // a new max: rescale the sum so far (exp(-inf) = 0 on the first element)
          s = s * std::exp(m - v) + acc_t(1);
          m = v;
        } else if (v != -std::numeric_limits<acc_t>::infinity()) {  // -inf adds 0 (and -inf - -inf is nan)
          s += std::exp(v - m);
        }
      }
      const acc_t log_s = nan ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(s);
      stats[2 * r] = m;
      stats[2 * r + 1] = log_s;
      row_loss[r] = y[r] == ignore_index ? 0.0 : static_cast<double>(log_s - (static_cast<acc_t>(zr[y[r]]) - m));
    }
  });
}

template <typename scalar_t>
void ce_bwd_kernel(const scalar_t* z, const int64_t* y, const void* stats_v, double scale, scalar_t* g, int64_t N,
                   int64_t V, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* stats = static_cast<const acc_t*>(stats_v);
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
      const acc_t m = stats[2 * r], log_s = stats[2 * r + 1];
      auto p = [&](int64_t c) { return std::exp((static_cast<acc_t>(zr[c]) - m) - log_s); };
      for (int64_t c = 0; c < V; ++c) gr[c] = static_cast<scalar_t>(p(c) * sc);
      gr[y[r]] = static_cast<scalar_t>((p(y[r]) - acc_t(1)) * sc);
    }
  });
}

}  // namespace

CrossEntropyFwdOut cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(stats_dtype(logits.scalar_type()));
  auto stats = at::empty({N, 2}, opts);
  std::vector<double> row_loss(static_cast<size_t>(N));
  const int64_t* y = targets.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    ce_fwd_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), y, stats.data_ptr(), row_loss, N, V, ignore_index);
  });
  // the mean over valid rows, summed in row order in double: deterministic, and exact enough for any N
  double total = 0;
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) {
    total += row_loss[r];
    n_valid += y[r] != ignore_index;
  }
  auto loss = at::full({}, total / static_cast<double>(std::max<int64_t>(n_valid, 1)), opts);
  return {loss, stats};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& stats, int64_t ignore_index) {
  const int64_t N = logits.size(0), V = logits.size(1);
  auto dlogits = at::empty_like(logits);
  const int64_t* y = targets.const_data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t r = 0; r < N; ++r) n_valid += y[r] != ignore_index;
  const double scale = dloss.item<double>() / static_cast<double>(std::max<int64_t>(n_valid, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    ce_bwd_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), y, stats.const_data_ptr(), scale,
                            dlogits.mutable_data_ptr<scalar_t>(), N, V, ignore_index);
  });
  return dlogits;
}

}  // namespace llm_kernels

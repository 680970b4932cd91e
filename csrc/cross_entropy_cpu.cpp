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
// Forward, float/half/bfloat16: two passes over each row (it stays in cache between them): the max m,
// then s = sum exp(z - m), each in 16 independent lanes
// with the vectorizable exp_nonpos() of cpu_vec.h, so both loops compile to SIMD code (AVX-512, AVX2
// or SSE2, chosen at load time).  float64: one scalar pass with the online max/sum (a running max and
// a running sum rescaled by exp(m_old - m_new) whenever the max grows) and std::exp in double.
// Saves stats (N, 2) = (m, log s) for the backward, which reads each row once and writes dlogits once
// (again vectorized for the 16/32-bit types).  The per-row losses go to a buffer and are summed in row
// order afterwards (deterministic whatever the thread count).  A NaN or +inf logit makes the row's
// loss and gradient NaN (+inf - +inf), as in the reference.
//
// Accumulation is in float for float/half/bfloat16 and in double for double; one rounding on store.
// Rows run in parallel (at::parallel_for).  Targets are validated by ops.cpp before these run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_vec.h"

namespace llm_kernels {
namespace {

// ---- float rows: the vectorized loops (half/bfloat16 rows are widened into a float buffer first) ----

// max_c z_c.  NaNs compare false and are passed over here; they (and a +inf, through +inf - +inf) turn
// the row's sum of exponentials into NaN in row_sum_exp, which makes its loss and gradient NaN.  (A
// NaN or +inf test in this loop would keep it from vectorizing: it ran 4x slower.)
LLM_CPU_CLONES float row_max(const float* z, int64_t V) {
  float lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  for (; c + kLanes <= V; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] = z[c + l] > lane[l] ? z[c + l] : lane[l];
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; c < V; ++c) m = z[c] > m ? z[c] : m;
  for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

// sum_c exp(z_c - m), for m = max(z) (every argument <= 0; -inf logits add 0; NaN if any z_c is NaN or
// m is +inf -- or -inf, a row of -inf only, whose log-softmax is NaN too)
LLM_CPU_CLONES float row_sum_exp(const float* z, int64_t V, float m) {
  float lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= V; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += exp_nonpos(z[c + l] - m);
  }
  float s = 0;
  for (; c < V; ++c) s += exp_nonpos(z[c] - m);
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// g_c = softmax(z)_c * scale = exp((z_c - m) - log s) * scale (NaN everywhere when log s is NaN)
LLM_CPU_CLONES void row_softmax_scaled(const float* z, int64_t V, float m, float log_s, float scale, float* g) {
  for (int64_t c = 0; c < V; ++c) g[c] = exp_nonpos((z[c] - m) - log_s) * scale;
}

template <typename scalar_t>
const float* as_float_row(const scalar_t* zr, int64_t V, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return zr;
  } else {
    buf.resize(static_cast<size_t>(V));
    for (int64_t c = 0; c < V; ++c) buf[c] = static_cast<float>(zr[c]);
    return buf.data();
  }
}

template <typename scalar_t>
void ce_fwd_kernel(const scalar_t* z, const int64_t* y, void* stats_v, std::vector<double>& row_loss, int64_t N,
                   int64_t V, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* stats = static_cast<acc_t*>(stats_v);  // (N, 2): m, log s
  const int64_t grain = std::max<int64_t>(1, 32768 / V);  // rows per task: ~32K logits
  if constexpr (std::is_same_v<acc_t, float>) {
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t r = begin; r < end; ++r) {
        const float* zr = as_float_row(z + r * V, V, buf);
        const float m = row_max(zr, V);
        const float log_s = std::log(row_sum_exp(zr, V, m));  // NaN for a row holding a NaN or +inf
        stats[2 * r] = m;
        stats[2 * r + 1] = log_s;
        row_loss[r] = y[r] == ignore_index ? 0.0 : static_cast<double>(log_s - (zr[y[r]] - m));
      }
    });
    return;
  }
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
  if constexpr (std::is_same_v<acc_t, float>) {
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf, out;
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gr = g + r * V;
        if (y[r] == ignore_index) {
          std::fill(gr, gr + V, static_cast<scalar_t>(0));
          continue;
        }
        const float* zr = as_float_row(z + r * V, V, buf);
        const float m = stats[2 * r], log_s = stats[2 * r + 1];
        const float p_target = std::exp((zr[y[r]] - m) - log_s);  // the one element std::exp still computes
        if constexpr (std::is_same_v<scalar_t, float>) {
          row_softmax_scaled(zr, V, m, log_s, sc, gr);
        } else {
          out.resize(static_cast<size_t>(V));
          row_softmax_scaled(zr, V, m, log_s, sc, out.data());
          for (int64_t c = 0; c < V; ++c) gr[c] = static_cast<scalar_t>(out[c]);
        }
        gr[y[r]] = static_cast<scalar_t>((p_target - 1.0f) * sc);
      }
    });
    return;
  }
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

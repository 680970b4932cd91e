// RoPE and SwiGLU in kernels._C: this op family's API layer (schemas, TORCH_CHECK validation, the CPU
// and CUDA registrations) and its CPU kernels, the C++ twins of rope_swiglu_cuda.cu.
//
// Ops (torch.ops.llm_kernels.*; the Python side, kernels/_cuda_rope_swiglu.py, registers their fakes and
// autograd formulas):
//   rope_fwd(x, cos, sin) -> y       x (B, H, T, D) float, any strides; cos, sin (T, D/2) float32 on
//                                    x's device; y (B, H, T, D) contiguous in x's dtype:
//                                    y1 = x1*cos - x2*sin, y2 = x2*cos + x1*sin ("rotate half":
//                                    x1, x2 = x[..., :D/2], x[..., D/2:]).
//   rope_bwd(dy, cos, sin) -> dx     the VJP, the inverse rotation: dx1 = dy1*cos + dy2*sin,
//                                    dx2 = dy2*cos - dy1*sin.  cos and sin get no gradient.
//   swiglu_fwd(gate, up) -> y        y = silu(gate) * up, same shape (any), dtype and device; y contiguous.
//   swiglu_bwd(dy, gate, up) -> (dgate, dup)
//                                    with s = sigmoid(gate): dgate = dy*up*s*(1 + gate*(1 - s)),
//                                    dup = dy*gate*s.
// Layout: x's B, H, T strides are read as they are (q and k are views of a fused projection); a last
// dim that is not unit-stride is copied to contiguous first (so are cos/sin columns; their row stride
// is read as is, so rows sliced at a KV-cache offset cost nothing).  gate/up/dy are viewed as (M, C)
// rows, each with its own row stride (copied only when no such view exists), or as one flat row when
// all are contiguous.
//
// CPU kernels.  RoPE: rows (b, h, t) in parallel (at::parallel_for), each a loop over its D/2 planes
// that the compiler vectorizes (float; half/bfloat16 rows are widened into float chunks first, double
// stays scalar in double).  SwiGLU: blocks of kBlock elements in parallel; sigmoid from
// e = exp(-|g|) in (0, 1] with cpu_vec.h's vectorizable exp_nonpos(): s = 1/(1+e) for g >= 0, e/(1+e)
// below, and 1 - s the other one, so neither overflows nor cancels.  Hot loops are built per x86-64
// level (LLM_CPU_CLONES).  fp32 math for float/half/bfloat16 (one rounding on store), fp64 for double.
// Non-finite values follow IEEE arithmetic as the reference does (silu(-inf) = -inf * 0 = NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "rope_swiglu.h"

namespace llm_kernels {

RopeSwigluCudaKernels& rope_swiglu_cuda_kernels() {
  static RopeSwigluCudaKernels table;
  return table;
}

namespace {

constexpr int64_t kBlock = 1024;  // elements per chunk widened to float / per SwiGLU task unit

// ---------------------------------------------------------------------------------------- RoPE

// y1 = x1*c - x2*(sign*s), y2 = x2*c + x1*(sign*s); sign = -1 is the inverse rotation (the backward)
LLM_CPU_CLONES void rotate_f32(const float* __restrict__ x1, const float* __restrict__ x2, const float* __restrict__ c,
                               const float* __restrict__ s, float* __restrict__ y1, float* __restrict__ y2, int64_t n,
                               float sign) {
  for (int64_t i = 0; i < n; ++i) {
    const float si = sign * s[i];
    y1[i] = x1[i] * c[i] - x2[i] * si;
    y2[i] = x2[i] * c[i] + x1[i] * si;
  }
}

struct RopeDims {
  int64_t B, H, T, half;
  int64_t sxb, sxh, sxt;  // x's strides (the last one is 1)
  int64_t sct, sst;       // cos's and sin's row strides (columns unit-stride)
};

template <typename scalar_t>
void rope_kernel(const scalar_t* x, const float* cos, const float* sin, scalar_t* y, const RopeDims& d, bool inverse) {
  const int64_t rows = d.B * d.H * d.T, half = d.half;
  const float sign = inverse ? -1.0f : 1.0f;
  const int64_t grain = std::max<int64_t>(1, 16384 / (2 * half));  // rows per task: ~16K elements
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    float buf[4 * kBlock];  // x1, x2, y1, y2 chunks of a 16-bit row, widened
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % d.T, bh = r / d.T;
      const scalar_t* x1 = x + (bh / d.H) * d.sxb + (bh % d.H) * d.sxh + t * d.sxt;
      const scalar_t* x2 = x1 + half;
      const float* c = cos + t * d.sct;
      const float* s = sin + t * d.sst;
      scalar_t* y1 = y + r * 2 * half;  // y (B, H, T, D) contiguous: row r = (b * H + h) * T + t
      scalar_t* y2 = y1 + half;
      if constexpr (std::is_same_v<scalar_t, float>) {
        rotate_f32(x1, x2, c, s, y1, y2, half, sign);
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t i = 0; i < half; ++i) {
          const double ci = c[i], si = sign * static_cast<double>(s[i]);
          y1[i] = x1[i] * ci - x2[i] * si;
          y2[i] = x2[i] * ci + x1[i] * si;
        }
      } else {
        for (int64_t i0 = 0; i0 < half; i0 += kBlock) {
          const int64_t n = std::min(kBlock, half - i0);
          for (int64_t i = 0; i < n; ++i) {
            buf[i] = static_cast<float>(x1[i0 + i]);
            buf[kBlock + i] = static_cast<float>(x2[i0 + i]);
          }
          rotate_f32(buf, buf + kBlock, c + i0, s + i0, buf + 2 * kBlock, buf + 3 * kBlock, n, sign);
          for (int64_t i = 0; i < n; ++i) {
            y1[i0 + i] = static_cast<scalar_t>(buf[2 * kBlock + i]);
            y2[i0 + i] = static_cast<scalar_t>(buf[3 * kBlock + i]);
          }
        }
      }
    }
  });
}

// -------------------------------------------------------------------------------------- SwiGLU

// s = sigmoid(g) and oms = 1 - s from e = exp(-|g|) in (0, 1]: no overflow, and 1 - s never cancels
inline void sigmoid_pair(float g, float& s, float& oms) {
  const float e = exp_nonpos(-std::fabs(g));
  const float inv = 1.0f / (1.0f + e);
  s = g >= 0.0f ? inv : e * inv;
  oms = g >= 0.0f ? e * inv : inv;
}

inline void sigmoid_pair(double g, double& s, double& oms) {
  const double e = std::exp(-std::fabs(g));
  const double inv = 1.0 / (1.0 + e);
  s = g >= 0.0 ? inv : e * inv;
  oms = g >= 0.0 ? e * inv : inv;
}

LLM_CPU_CLONES void swiglu_fwd_f32(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float s, oms;
    sigmoid_pair(g[i], s, oms);
    y[i] = g[i] * s * u[i];
  }
}

LLM_CPU_CLONES void swiglu_bwd_f32(const float* __restrict__ g, const float* __restrict__ u,
                                   const float* __restrict__ dy, float* __restrict__ dg, float* __restrict__ du,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float s, oms;
    sigmoid_pair(g[i], s, oms);
    dg[i] = dy[i] * u[i] * s * (1.0f + g[i] * oms);
    du[i] = dy[i] * g[i] * s;
  }
}

// fn(row, first column, count) over every kBlock-wide piece of (M, C) rows, in parallel
template <typename Fn>
void for_each_block(int64_t M, int64_t C, const Fn& fn) {
  const int64_t per_row = (C + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::min(C, kBlock));  // pieces per task: ~16K elements
  at::parallel_for(0, M * per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / per_row, c0 = (i % per_row) * kBlock;
      fn(r, c0, std::min(kBlock, C - c0));
    }
  });
}

struct Rows {  // (M, C) with unit-stride columns; row strides per tensor
  int64_t M, C;
};

// widen n elements to float (a no-op view for float)
template <typename scalar_t>
const float* widen(const scalar_t* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}

template <typename scalar_t>
void swiglu_fwd_kernel(const scalar_t* g, int64_t sg, const scalar_t* u, int64_t su, scalar_t* y, Rows d) {
  for_each_block(d.M, d.C, [&](int64_t r, int64_t c0, int64_t n) {
    const scalar_t* gr = g + r * sg + c0;
    const scalar_t* ur = u + r * su + c0;
    scalar_t* yr = y + r * d.C + c0;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = 0; i < n; ++i) {
        double s, oms;
        sigmoid_pair(gr[i], s, oms);
        yr[i] = gr[i] * s * ur[i];
      }
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      swiglu_fwd_f32(gr, ur, yr, n);
    } else {
      float buf[3 * kBlock];
      swiglu_fwd_f32(widen(gr, n, buf), widen(ur, n, buf + kBlock), buf + 2 * kBlock, n);
      for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<scalar_t>(buf[2 * kBlock + i]);
    }
  });
}

template <typename scalar_t>
void swiglu_bwd_kernel(const scalar_t* dy, int64_t sdy, const scalar_t* g, int64_t sg, const scalar_t* u, int64_t su,
                       scalar_t* dg, scalar_t* du, Rows d) {
  for_each_block(d.M, d.C, [&](int64_t r, int64_t c0, int64_t n) {
    const scalar_t* dyr = dy + r * sdy + c0;
    const scalar_t* gr = g + r * sg + c0;
    const scalar_t* ur = u + r * su + c0;
    scalar_t* dgr = dg + r * d.C + c0;
    scalar_t* dur = du + r * d.C + c0;
    if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t i = 0; i < n; ++i) {
        double s, oms;
        sigmoid_pair(gr[i], s, oms);
        dgr[i] = dyr[i] * ur[i] * s * (1.0 + gr[i] * oms);
        dur[i] = dyr[i] * gr[i] * s;
      }
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      swiglu_bwd_f32(gr, ur, dyr, dgr, dur, n);
    } else {
      float buf[5 * kBlock];
      swiglu_bwd_f32(widen(gr, n, buf), widen(ur, n, buf + kBlock), widen(dyr, n, buf + 2 * kBlock), buf + 3 * kBlock,
                     buf + 4 * kBlock, n);
      for (int64_t i = 0; i < n; ++i) {
        dgr[i] = static_cast<scalar_t>(buf[3 * kBlock + i]);
        dur[i] = static_cast<scalar_t>(buf[4 * kBlock + i]);
      }
    }
  });
}

}  // namespace

// ------------------------------------------------------------------------------ CPU entry points

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  auto y = at::empty(x.sizes(), x.options());
  const RopeDims d{x.size(0), x.size(1), x.size(2), x.size(3) / 2, x.stride(0), x.stride(1), x.stride(2),
                   cos.stride(0), sin.stride(0)};
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_cpu", [&] {
    rope_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
                          y.mutable_data_ptr<scalar_t>(), d, inverse);
  });
  return y;
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  auto y = at::empty(gate.sizes(), gate.options());  // (M, C) contiguous
  const Rows d{gate.size(0), gate.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    swiglu_fwd_kernel<scalar_t>(gate.const_data_ptr<scalar_t>(), gate.stride(0), up.const_data_ptr<scalar_t>(),
                                up.stride(0), y.mutable_data_ptr<scalar_t>(), d);
  });
  return y;
}

SwigluBwdOut swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  auto dg = at::empty(gate.sizes(), gate.options());
  auto du = at::empty(gate.sizes(), gate.options());
  const Rows d{gate.size(0), gate.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    swiglu_bwd_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), dy.stride(0), gate.const_data_ptr<scalar_t>(),
                                gate.stride(0), up.const_data_ptr<scalar_t>(), up.stride(0),
                                dg.mutable_data_ptr<scalar_t>(), du.mutable_data_ptr<scalar_t>(), d);
  });
  return {dg, du};
}

// ============================================================================ the API layer

namespace {

std::string describe(const at::Tensor& t) {
  return c10::str("shape ", t.sizes(), ", dtype ", t.scalar_type(), ", device ", t.device());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", describe(t));
}

void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type() && t.device() == ref.device(), op, ": ",
              name, " must match ", ref_name, " (", describe(ref), ") in shape, dtype and device, got ", describe(t));
}

// x (B, H, T, D) float with D even and positive; cos, sin (T, D/2) float32 on x's device
void check_rope(const char* op, const char* name, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(op, name, x);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (B, H, T, D), got ", describe(x));
  const int64_t T = x.size(2), D = x.size(3);
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": ", name, "'s head dim D must be even and positive (D/2 planes are turned), got ",
              describe(x));
  for (const auto& [tname, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == T && t.size(1) == D / 2 &&
                    t.device() == x.device(),
                op, ": ", tname, " must be float32 with shape [", T, ", ", D / 2, "] (T, D/2) on ", name, "'s device ",
                x.device(), ", got ", describe(t));
  }
}

at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) == 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// (..., C) -> (M, C) with unit-stride columns: a view where one exists; one flat row when all are contiguous
std::vector<at::Tensor> as_rows(std::initializer_list<at::Tensor> ts) {
  std::vector<at::Tensor> out;
  const bool flat = std::all_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.is_contiguous(); });
  for (const auto& t : ts) {
    if (flat) {
      out.push_back(t.reshape({1, t.numel()}));
    } else {
      const int64_t C = t.size(-1);
      out.push_back(unit_last(t.reshape({-1, C})));
    }
  }
  return out;
}

constexpr const char* kNoCuda =
    "kernels._C was built without its CUDA kernels (CPU-only build: no GPU visible at build time, "
    "LLM_SKIP_CUDA_BUILD=1, a CPU-only torch or no CUDA toolkit); rebuild with `pip install -e . "
    "--no-build-isolation --no-deps` on a machine with nvcc and this GPU (or TORCH_CUDA_ARCH_LIST set)";

using RopeFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);

at::Tensor rope_op(const char* op, const char* name, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   bool inverse, bool cuda) {
  check_rope(op, name, x, cos, sin);
  RopeFn fn = &rope_cpu;
  if (cuda) {
    fn = rope_swiglu_cuda_kernels().rope;
    TORCH_CHECK(fn != nullptr, op, ": ", kNoCuda);
  }
  return fn(unit_last(x), unit_last(cos), unit_last(sin), inverse);
}

at::Tensor rope_fwd_cpu_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_op("rope_fwd", "x", x, cos, sin, false, false);
}
at::Tensor rope_bwd_cpu_op(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_op("rope_bwd", "dy", dy, cos, sin, true, false);
}
at::Tensor rope_fwd_cuda_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_op("rope_fwd", "x", x, cos, sin, false, true);
}
at::Tensor rope_bwd_cuda_op(const at::Tensor& dy, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_op("rope_bwd", "dy", dy, cos, sin, true, true);
}

at::Tensor swiglu_fwd_op(const at::Tensor& gate, const at::Tensor& up, bool cuda) {
  const char* op = "swiglu_fwd";
  check_float(op, "gate", gate);
  check_same(op, "up", up, "gate", gate);
  if (gate.numel() == 0) return at::empty(gate.sizes(), gate.options());
  auto rows = as_rows({gate, up});  // (M, C) each
  at::Tensor y;
  if (cuda) {
    TORCH_CHECK(rope_swiglu_cuda_kernels().swiglu_fwd != nullptr, op, ": ", kNoCuda);
    y = rope_swiglu_cuda_kernels().swiglu_fwd(rows[0], rows[1]);
  } else {
    y = swiglu_fwd_cpu(rows[0], rows[1]);
  }
  return y.view(gate.sizes());  // (M, C) contiguous -> gate's shape
}

SwigluBwdOut swiglu_bwd_op(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, bool cuda) {
  const char* op = "swiglu_bwd";
  check_float(op, "gate", gate);
  check_same(op, "up", up, "gate", gate);
  check_same(op, "dy", dy, "gate", gate);
  if (gate.numel() == 0) return {at::empty(gate.sizes(), gate.options()), at::empty(gate.sizes(), gate.options())};
  auto rows = as_rows({dy, gate, up});
  SwigluBwdOut out;
  if (cuda) {
    TORCH_CHECK(rope_swiglu_cuda_kernels().swiglu_bwd != nullptr, op, ": ", kNoCuda);
    out = rope_swiglu_cuda_kernels().swiglu_bwd(rows[0], rows[1], rows[2]);
  } else {
    out = swiglu_bwd_cpu(rows[0], rows[1], rows[2]);
  }
  return {std::get<0>(out).view(gate.sizes()), std::get<1>(out).view(gate.sizes())};
}

at::Tensor swiglu_fwd_cpu_op(const at::Tensor& gate, const at::Tensor& up) { return swiglu_fwd_op(gate, up, false); }
at::Tensor swiglu_fwd_cuda_op(const at::Tensor& gate, const at::Tensor& up) { return swiglu_fwd_op(gate, up, true); }
SwigluBwdOut swiglu_bwd_cpu_op(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  return swiglu_bwd_op(dy, gate, up, false);
}
SwigluBwdOut swiglu_bwd_cuda_op(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  return swiglu_bwd_op(dy, gate, up, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_kernels, m) {
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor y");
  m.def("rope_bwd(Tensor dy, Tensor cos, Tensor sin) -> Tensor dx");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor y");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
}

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("rope_fwd", &rope_fwd_cpu_op);
  m.impl("rope_bwd", &rope_bwd_cpu_op);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu_op);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu_op);
}

TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("rope_fwd", &rope_fwd_cuda_op);
  m.impl("rope_bwd", &rope_bwd_cuda_op);
  m.impl("swiglu_fwd", &swiglu_fwd_cuda_op);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda_op);
}

}  // namespace llm_kernels

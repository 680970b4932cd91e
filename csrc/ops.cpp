// The API layer of kernels._C: declares the ops once with TORCH_LIBRARY, validates every input with
// TORCH_CHECK (naming the tensor and printing its shape, dtype and device), and registers the CPU
// kernels (*_cpu.cpp) and the CUDA kernels (*.cu, CUDA build only).  One section per op family:
// LayerNorm, then add_layer_norm and cross-entropy, then causal attention.
//
// Python side: kernels/_cuda_backend.py registers the fake (meta) implementations and the autograd
// formulas with torch.library, and the "cuda" backend's ops.
//
// Ops (namespace llm_kernels, i.e. torch.ops.llm_kernels.*), on 2-D (M, C) tensors:
//   layer_norm_fwd(x, weight, bias, eps) -> (y, mean, rstd)
//       y (M, C) in x's dtype; mean, rstd (M,) in float32 (float64 for float64 x).
//   layer_norm_bwd(dy, x, weight, mean, rstd) -> (dx, dweight, dbias)
//       dx (M, C) in x's dtype; dweight, dbias (C,) in weight's dtype (accumulated in fp32/fp64).
// weight and bias must have x's dtype (the Python wrapper casts them); inputs may be non-contiguous.
//
// add_layer_norm and cross-entropy (their own section at the end of this file; kernels in
// layernorm_cpu.cpp / layernorm_cuda.cu and cross_entropy_cpu.cpp / cross_entropy_cuda.cu):
//   add_layer_norm_fwd(x, residual, weight, bias, eps) -> (y, sum, mean, rstd)
//       sum = x + residual (M, C) in x's dtype, y = layer_norm(sum); backward: layer_norm_bwd on sum.
//   cross_entropy_fwd(logits, targets, ignore_index) -> (loss, stats)    stats (N, 2): the rows' max, log-sum
//       logits (N, V) float, targets (N,) int64; loss the 0-d mean over non-ignored rows (0 if none),
//       stats (N, 2) each row's max m and log(sum(exp(z - m))), both float32 (float64 for float64 logits).
//   cross_entropy_bwd(dloss, logits, targets, stats, ignore_index) -> dlogits
//       (softmax - onehot) * dloss / n_valid per row, zero rows for ignored targets; logits' dtype.
// Target values are checked here for CPU tensors.  On CUDA that would cost a host sync per call, so
// the kernels check them instead: an out-of-range target (neither in [0, V) nor ignore_index) makes
// the loss and that row's dlogits NaN.
//
// causal attention (its own section at the end):
//   attention_fwd(q, k, v, scale) -> (out, lse), attention_bwd(dout, q, k, v, out, lse, scale) -> (dq, dk, dv):
//       causal attention (attention_cpu.cpp, attention_cuda.cu); see the "causal attention" section below.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace llm_kernels {

CudaKernels& cuda_kernels() {
  static CudaKernels table;
  return table;
}

namespace {

std::string describe(const at::Tensor& t) {
  return c10::str("shape ", t.sizes(), ", dtype ", t.scalar_type(), ", device ", t.device());
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", describe(t));
}

void check_like_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C,
              "] to match x's last dim, got ", describe(t));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", describe(t));
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
              describe(t));
}

void check_x(const char* op, const at::Tensor& x) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, op, ": x must be 2-D (M, C) with C > 0, got ", describe(x));
}

void check_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const char* op = "layer_norm_fwd";
  check_x(op, x);
  check_like_param(op, "weight", weight, x);
  check_like_param(op, "bias", bias, x);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite positive number, got ", eps);
}

void check_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
               const at::Tensor& rstd) {
  const char* op = "layer_norm_bwd";
  check_x(op, x);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(), op,
              ": dy must match x (", describe(x), "), got ", describe(dy));
  check_like_param(op, "weight", weight, x);
  const auto sd = stats_dtype(x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == sd && t.device() == x.device(), op,
                ": ", name, " must have shape [", x.size(0), "], dtype ", sd, " and device ", x.device(),
                " (as layer_norm_fwd returns it), got ", describe(t));
  }
}

LayerNormFwdOut fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_fwd(x, weight, bias, eps);
  return layer_norm_fwd_cpu(x.contiguous(), weight.contiguous(), bias.contiguous(), eps);
}

LayerNormBwdOut bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                        const at::Tensor& rstd) {
  check_bwd(dy, x, weight, mean, rstd);
  return layer_norm_bwd_cpu(dy.contiguous(), x.contiguous(), weight.contiguous(), mean.contiguous(),
                            rstd.contiguous());
}

constexpr const char* kNoCuda =
    "kernels._C was built without its CUDA kernels (CPU-only build: no GPU visible at build time, "
    "LLM_SKIP_CUDA_BUILD=1, a CPU-only torch or no CUDA toolkit); rebuild with `pip install -e . "
    "--no-build-isolation --no-deps` on a machine with nvcc and this GPU (or TORCH_CUDA_ARCH_LIST set)";

LayerNormFwdOut fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_fwd(x, weight, bias, eps);
  TORCH_CHECK(cuda_kernels().layer_norm_fwd != nullptr, "layer_norm_fwd: ", kNoCuda);
  return cuda_kernels().layer_norm_fwd(x.contiguous(), weight.contiguous(), bias.contiguous(), eps);
}

LayerNormBwdOut bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                         const at::Tensor& rstd) {
  check_bwd(dy, x, weight, mean, rstd);
  TORCH_CHECK(cuda_kernels().layer_norm_bwd != nullptr, "layer_norm_bwd: ", kNoCuda);
  return cuda_kernels().layer_norm_bwd(dy.contiguous(), x.contiguous(), weight.contiguous(), mean.contiguous(),
                                       rstd.contiguous());
}

}  // namespace

TORCH_LIBRARY(llm_kernels, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("layer_norm_fwd", &fwd_cpu);
  m.impl("layer_norm_bwd", &bwd_cpu);
}

TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("layer_norm_fwd", &fwd_cuda);
  m.impl("layer_norm_bwd", &bwd_cuda);
}

// ---- add_layer_norm and cross-entropy ------------------------------------------------------------

namespace {

void check_add_fwd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                   double eps) {
  const char* op = "add_layer_norm_fwd";
  check_x(op, x);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type() &&
                  residual.device() == x.device(),
              op, ": residual must match x (", describe(x), "), got ", describe(residual));
  check_like_param(op, "weight", weight, x);
  check_like_param(op, "bias", bias, x);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite positive number, got ", eps);
}

AddLayerNormFwdOut add_fwd_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                               const at::Tensor& bias, double eps) {
  check_add_fwd(x, residual, weight, bias, eps);
  return add_layer_norm_fwd_cpu(x.contiguous(), residual.contiguous(), weight.contiguous(), bias.contiguous(), eps);
}

AddLayerNormFwdOut add_fwd_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  check_add_fwd(x, residual, weight, bias, eps);
  TORCH_CHECK(cuda_kernels().add_layer_norm_fwd != nullptr, "add_layer_norm_fwd: ", kNoCuda);
  return cuda_kernels().add_layer_norm_fwd(x.contiguous(), residual.contiguous(), weight.contiguous(),
                                           bias.contiguous(), eps);
}

// logits (N, V) float, targets (N,) int64 on logits' device; on the CPU every target in [0, V) or ignored.
void check_logits_targets(const char* op, const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be 2-D (N, V) with V > 0, got ",
              describe(logits));
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == N && targets.scalar_type() == at::kLong &&
                  targets.device() == logits.device(),
              op, ": targets must have shape [", N, "], dtype int64 and device ", logits.device(),
              " (one class id per row of logits), got ", describe(targets));
  if (targets.device().is_cpu()) {
    const at::Tensor t = targets.contiguous();
    const int64_t* y = t.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK(y[r] == ignore_index || (y[r] >= 0 && y[r] < V), op, ": targets must be in [0, ", V,
                  ") or equal ignore_index=", ignore_index, "; found ", y[r], " at row ", r, " (targets: ",
                  describe(targets), ")");
    }
  }
}

void check_ce_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& stats,
                  int64_t ignore_index) {
  const char* op = "cross_entropy_bwd";
  check_logits_targets(op, logits, targets, ignore_index);
  check_float(op, "dloss", dloss);
  TORCH_CHECK(dloss.dim() == 0 && dloss.device() == logits.device(), op,
              ": dloss must be a 0-d tensor (the loss's gradient) on device ", logits.device(), ", got ",
              describe(dloss));
  const auto sd = stats_dtype(logits.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == 2 && stats.scalar_type() == sd &&
                  stats.device() == logits.device(),
              op, ": stats must have shape [", logits.size(0), ", 2], dtype ", sd, " and device ", logits.device(),
              " (the rows' max and log-sum, as cross_entropy_fwd returns them), got ", describe(stats));
}

CrossEntropyFwdOut ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_logits_targets("cross_entropy_fwd", logits, targets, ignore_index);
  return cross_entropy_fwd_cpu(logits.contiguous(), targets.contiguous(), ignore_index);
}

at::Tensor ce_bwd_cpu(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                      const at::Tensor& stats, int64_t ignore_index) {
  check_ce_bwd(dloss, logits, targets, stats, ignore_index);
  return cross_entropy_bwd_cpu(dloss, logits.contiguous(), targets.contiguous(), stats.contiguous(), ignore_index);
}

CrossEntropyFwdOut ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_logits_targets("cross_entropy_fwd", logits, targets, ignore_index);
  TORCH_CHECK(cuda_kernels().cross_entropy_fwd != nullptr, "cross_entropy_fwd: ", kNoCuda);
  return cuda_kernels().cross_entropy_fwd(logits.contiguous(), targets.contiguous(), ignore_index);
}

at::Tensor ce_bwd_cuda(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& targets,
                       const at::Tensor& stats, int64_t ignore_index) {
  check_ce_bwd(dloss, logits, targets, stats, ignore_index);
  TORCH_CHECK(cuda_kernels().cross_entropy_bwd != nullptr, "cross_entropy_bwd: ", kNoCuda);
  return cuda_kernels().cross_entropy_bwd(dloss, logits.contiguous(), targets.contiguous(), stats.contiguous(),
                                          ignore_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_kernels, m) {
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> "
      "(Tensor y, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor loss, Tensor stats)");
  m.def(
      "cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor targets, Tensor stats, int ignore_index) -> "
      "Tensor dlogits");
}

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_fwd_cpu);
  m.impl("cross_entropy_fwd", &ce_fwd_cpu);
  m.impl("cross_entropy_bwd", &ce_bwd_cpu);
}

TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("add_layer_norm_fwd", &add_fwd_cuda);
  m.impl("cross_entropy_fwd", &ce_fwd_cuda);
  m.impl("cross_entropy_bwd", &ce_bwd_cuda);
}

// ---- end add_layer_norm and cross-entropy --------------------------------------------------------

// ===================================================================== causal attention (attention_*)
// attention_fwd(q, k, v, scale) -> (out, lse) and attention_bwd(dout, q, k, v, out, lse, scale) ->
// (dq, dk, dv): q (B, H, Tq, D), k/v (B, H_kv, Tk, D) with H a multiple of H_kv (grouped-query attention:
// query head h reads k/v head h / (H / H_kv)), 1 <= Tq <= Tk, one float dtype and device; the causal
// mask is aligned bottom-right (query i sees keys j <= i + Tk - Tq).  out, dq (B, H, Tq, D) in q's dtype;
// dk, dv (B, H_kv, Tk, D), each the sum over its group's query heads; lse (B, H, Tq) = log-sum-exp of
// each query row's scaled, masked scores, in float32
// (float64 for float64 q).  CPU: any D >= 1, all four float dtypes.  CUDA: float16/bfloat16 and
// D in {64, 128} only (tensor-core kernels; the Python backend sends float64 to the reference).
namespace {

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", describe(t));
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
              describe(t));
}

void check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    check_float(op, name, t);
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, T, D), got ", describe(t));
    TORCH_CHECK(t.numel() > 0, op, ": ", name, " must not be empty, got ", describe(t));
  }
  check_like(op, "k", k, q);
  check_like(op, "v", v, q);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", describe(k), " and v ",
              describe(v));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op,
              ": q and k/v must agree in batch and head dim (B, _, _, D), got q ", describe(q), " and k ",
              describe(k));
  TORCH_CHECK(q.size(1) % k.size(1) == 0, op, ": q's ", q.size(1), " heads must be a multiple of k/v's ", k.size(1),
              " (grouped-query attention shares each k/v head among H / H_kv query heads), got q ", describe(q),
              " and k ", describe(k));
  TORCH_CHECK(q.size(2) <= k.size(2), op, ": q has more positions than k/v (Tq=", q.size(2), " > Tk=", k.size(2),
              "); the queries are the last Tq of the Tk positions; got q ", describe(q), " and k ", describe(k));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a finite positive number, got ", scale);
}

void check_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, double scale) {
  const char* op = "attention_bwd";
  check_attention(op, q, k, v, scale);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"dout", dout}, {"out", out}}) {
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(), op, ": ",
                name, " must match q (", describe(q), "), got ", describe(t));
  }
  const auto sd = stats_dtype(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.scalar_type() == sd && lse.device() == q.device(),
              op, ": lse must have shape [", q.size(0), ", ", q.size(1), ", ", q.size(2), "], dtype ", sd,
              " and device ", q.device(), " (as attention_fwd returns it), got ", describe(lse));
}

// What the CUDA kernels are built for (checked before the table, so the message is the same in any build).
void check_attention_cuda(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernels take float16 or bfloat16 (tensor cores, fp32 accumulation), got q with ",
              describe(q));
  TORCH_CHECK(attention_cuda_supports_head_dim(q.size(3)), op,
              ": the CUDA kernels support head dims D in {64, 128}, got q with ", describe(q));
}

AttentionFwdOut attention_fwd_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_attention("attention_fwd", q, k, v, scale);
  return attention_fwd_cpu(q.contiguous(), k.contiguous(), v.contiguous(), scale);
}

AttentionBwdOut attention_bwd_cpu_op(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_bwd(dout, q, k, v, out, lse, scale);
  return attention_bwd_cpu(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                           lse.contiguous(), scale);
}

AttentionFwdOut attention_fwd_cuda_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_attention("attention_fwd", q, k, v, scale);
  check_attention_cuda("attention_fwd", q);
  TORCH_CHECK(cuda_kernels().attention_fwd != nullptr, "attention_fwd: ", kNoCuda);
  return cuda_kernels().attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), scale);
}

AttentionBwdOut attention_bwd_cuda_op(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      double scale) {
  check_attention_bwd(dout, q, k, v, out, lse, scale);
  check_attention_cuda("attention_bwd", q);
  TORCH_CHECK(cuda_kernels().attention_bwd != nullptr, "attention_bwd: ", kNoCuda);
  return cuda_kernels().attention_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
                                      out.contiguous(), lse.contiguous(), scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm_kernels, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(llm_kernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu_op);
  m.impl("attention_bwd", &attention_bwd_cpu_op);
}

TORCH_LIBRARY_IMPL(llm_kernels, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda_op);
  m.impl("attention_bwd", &attention_bwd_cuda_op);
}
// ================================================================= end causal attention (attention_*)

}  // namespace llm_kernels

// The CUDA code this library holds, as setup.py passes it: -DLLM_CUDA_ARCHS=sm_75,sm_80,sm_90 (cubins,
// plus compute_XY for embedded PTX); undefined, so "", in a CPU-only build.  kernels/_cuda_backend.py
// checks a GPU against it before any launch (a GPU the library has no code for would otherwise fail
// with "no kernel image is available").  Stringified here because quotes would not survive the shell
// that ninja runs the compiler in.
#define LLM_STRINGIFY_(...) #__VA_ARGS__
#define LLM_STRINGIFY(...) LLM_STRINGIFY_(__VA_ARGS__)
#ifdef LLM_CUDA_ARCHS
constexpr const char* kCudaArchs = LLM_STRINGIFY(LLM_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

// `import kernels._C` needs a module init function; the ops register themselves (TORCH_LIBRARY's static
// initializers) when the shared library loads, so the module holds only the attribute cuda_archs
// (kCudaArchs above).  No pybind11 needed.
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC holds the extern "C"
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "C++/CUDA kernels; ops live in torch.ops.llm_kernels",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "cuda_archs", kCudaArchs) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

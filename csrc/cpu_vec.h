// Helpers for CPU loops the compiler turns into SIMD code: a vectorizable exp() for softmax arguments,
// and one build of each hot loop per x86-64 level, chosen when the library loads.
//
// std::exp is an opaque library call, so a loop over it runs one element at a time (~4 ns each on a
// Xeon core, which made softmax cross-entropy over V = 50257 the slowest part of a small model's step).
// exp_nonpos() is plain arithmetic instead -- a polynomial and an exponent built from bits -- which the
// compiler vectorizes like any multiply-add loop.  LLM_CPU_CLONES compiles a function three times
// (AVX-512, AVX2+FMA, baseline SSE2) and picks the best the CPU running it has (GCC/clang function
// multi-versioning, resolved once by the dynamic loader on Linux); elsewhere (macOS, Windows, arm64,
// where NEON is the baseline anyway) it compiles once for the target's baseline.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define LLM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLM_CPU_CLONES
#endif

namespace llm_kernels {

// Lanes of the partial sums/maxima the vectorized loops keep: 16 floats = one AVX-512 register.
constexpr int kLanes = 16;

// e^x for x <= 0 (softmax arguments z - max), relative error below 2.3e-7 (about 2 ulp) where e^x is a
// normal float; 0 below x = -87.3 (where e^x < FLT_MIN; the sums it feeds are >= 1); NaN in, NaN out.
// x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two for an exact n ln2),
// e^r by its degree-6 Taylor polynomial (Horner), 2^n by writing n + 127 into a float's exponent.
inline float exp_nonpos(float x) {
  const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: t = y + shifter rounds y to an integer in t's low bits
  const float xc = x < -87.3f ? -87.3f : x;
  const float t = xc * log2e + shifter;
  const float n = t - shifter;
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t t_bits, shifter_bits;  // unsigned: wrap-around is defined (a NaN x gives garbage bits, NaN p)
  std::memcpy(&t_bits, &t, sizeof t);
  std::memcpy(&shifter_bits, &shifter, sizeof shifter);
  const uint32_t bits = (t_bits - shifter_bits + 127u) << 23;  // n + 127 in the exponent field
  float two_n;
  std::memcpy(&two_n, &bits, sizeof bits);
  return x < -87.3f ? 0.0f : p * two_n;
}

}  // namespace llm_kernels

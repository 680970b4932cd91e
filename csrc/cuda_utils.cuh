// Small pieces the CUDA kernel files share: the dtype dispatch, 16-byte vectors, alignment tests.
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>

namespace llm_kernels {

// float, half and bfloat16 only (float64 goes to the torch backend): 3 instantiations, not 4.
#define LLM_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// N elements of T moved as one load/store: 16 bytes for N = 16 / sizeof(T).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace llm_kernels

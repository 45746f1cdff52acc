// Vector primitives of the fused depthwise conv CPU kernels (dwconv_cpu_kernels.h): 32-byte
// vector types, deterministic lane sums, and the dtype conversions of whole runs. Plain C++ on
// pointers (no ATen); included by dwconv_cpu_kernels.h.
//
// The hot loops run on the accumulation type T only (float for float32, float16 and bfloat16
// tensors, double for float64), so one compiled copy per instruction-set path serves every
// dtype; the tensor's dtype is met only in the conversions here.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "fercuda/dwconv_math.h"
#include "fercuda/hd.h"

namespace fercuda {
namespace dwconv_cpu {
// Internal linkage, like the op glue: private to dwconv_cpu.cpp, the file that includes it
// (fercuda._C exports none of these symbols).
namespace {

// ---- 32-byte vectors (one AVX2 register; two SSE registers on the baseline path) ----------

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kVecLen = 32 / sizeof(T);

// Always inlined, so no vector ever crosses a call boundary (the -Wpsabi note about
// AVX vectors in the baseline ABI does not apply).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
__attribute__((always_inline)) inline Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
__attribute__((always_inline)) inline void store_vec(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
#pragma GCC diagnostic pop

// ---- Conversions ------------------------------------------------------------------------

// float -> bfloat16 bits of 8 lanes, as c10::BFloat16(float) rounds: to nearest even, any NaN
// to 0x7FC0. Written with vector integer operations (the compiler's version of the scalar
// conversion takes several times as many instructions).
typedef uint32_t VecU32 __attribute__((vector_size(32)));
typedef uint16_t VecU16 __attribute__((vector_size(16)));
// Vectors cross no call boundary in this section either (always inlined).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
__attribute__((always_inline)) inline VecU16 bfloat16_bits(Vec<float> v) {
  VecU32 u;
  std::memcpy(&u, &v, sizeof(u));
  const VecU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const VecU32 nan = (VecU32)(v != v);  // all ones in NaN lanes
  return __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), VecU16);
}

template <typename To>
constexpr bool kNarrowsToBFloat16 = std::is_same_v<To, c10::BFloat16>;

// dst[i] = src[i] converted (bfloat16 / float16 widened, or narrowed with rounding to nearest).
template <typename From, typename To>
void convert_run(const From* __restrict src, int64_t n, To* __restrict dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<From, float> && kNarrowsToBFloat16<To>) {
    for (; i + 8 <= n; i += 8) {
      const VecU16 b = bfloat16_bits(load_vec(src + i));
      std::memcpy(dst + i, &b, sizeof(b));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<To>(src[i]);
}

// dst[i] = relu6(src[i]), narrowed to the output dtype.
template <typename T, typename To>
void relu6_convert_run(const T* __restrict src, int64_t n, To* __restrict dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float> && kNarrowsToBFloat16<To>) {
    const Vec<float> zero = Vec<float>{}, six = zero + 6.0f;
    for (; i + 8 <= n; i += 8) {
      Vec<float> a = load_vec(src + i);
      a = a < zero ? zero : (a > six ? six : a);  // as dwconv::relu6 (NaN propagates)
      const VecU16 b = bfloat16_bits(a);
      std::memcpy(dst + i, &b, sizeof(b));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<To>(dwconv::relu6(src[i]));
}
#pragma GCC diagnostic pop

// A run of n values of the tensor's dtype as T: the same memory when the types agree,
// else a widened copy in buf.
template <typename scalar_t, typename T>
const T* load_as(const scalar_t* p, int64_t n, T* buf) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return p;
  } else {
    convert_run(p, n, buf);
    return buf;
  }
}

// ---- Deterministic sums -------------------------------------------------------------------

// Floating-point sums do not vectorize unless reordered; kLanes independent partial sums,
// combined in a fixed order at the end, let the compiler use full vectors and keep the
// result deterministic.
constexpr int64_t kLanes = 16;

template <typename T>
T combine_lanes(const T* acc, T tail) {
  for (int64_t j = 0; j < kLanes; ++j) tail += acc[j];
  return tail;
}

template <typename T>
T sum_of(const T* __restrict v, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += v[i + j];
  T tail = 0;
  for (; i < n; ++i) tail += v[i];
  return combine_lanes(acc, tail);
}

}  // namespace
}  // namespace dwconv_cpu
}  // namespace fercuda

// Loops of the BatchNorm + ReLU6 (or identity) + residual add CPU ops, compiled once per
// instruction-set path (bn_act_cpu_compute.h in bn_act_cpu_path_*.cpp): plain C++ on pointers, no
// ATen. S is the tensor's storage type (float, double, c10::Half,
// c10::BFloat16), T the accumulation type (float, or double for double); the loops load S as T,
// compute in T and store S, written so that GCC vectorizes them (bfloat16 widened by a shift and
// narrowed by integer rounding, as c10::BFloat16 rounds).
//
// Two kinds of run, one per layout:
//  plane runs (NCHW): n values of one channel, contiguous; the per-channel values are scalars;
//  row runs (channels_last): rows of C values, one per channel; the per-channel values are (C,)
//  arrays, and the loops run along C.
// Every reduction returns a part's result, which the caller merges in a fixed order: partial
// sums in lanes (plane runs) or per channel (row runs), never in an order that depends on threads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fercuda/bn_act_math.h"

namespace fercuda {
namespace bn_act_cpu {
// Internal linkage: each path's translation unit has its own copy, compiled for its instruction set.
namespace {

// ---- Loads and stores ------------------------------------------------------------------------

template <typename S>
__attribute__((always_inline)) inline auto load(const S& v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else if constexpr (std::is_same_v<S, c10::Half>) {
    return static_cast<float>(v);
  } else {
    return v;
  }
}

template <typename S, typename T>
__attribute__((always_inline)) inline S store(T v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    // Round to nearest even, any NaN to 0x7FC0: c10::BFloat16(float).
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    S out;
    out.x = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return out;
  } else {
    return static_cast<S>(v);
  }
}

constexpr int64_t kLanes = 16;

template <typename T>
T combine_lanes(const T* acc) {
  T s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// ---- 16-lane vectors (one AVX-512 register; two AVX2 or four SSE ones on the other paths) --------
//
// Always inlined: no vector crosses a call boundary (the -Wpsabi note about the ABI of wide vectors
// on the narrower paths does not apply).

constexpr int64_t kLanes16 = 16;
typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));
typedef uint16_t H16 __attribute__((vector_size(32)));

// float32 and bfloat16 runs go through these vectors; float16 and float64 through scalar loops.
template <typename S>
constexpr bool kVectorRuns = std::is_same_v<S, float> || std::is_same_v<S, c10::BFloat16>;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename S>
__attribute__((always_inline)) inline V16 load16(const S* p) {
  V16 v;
  if constexpr (std::is_same_v<S, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    H16 h;
    std::memcpy(&h, p, sizeof(h));
    const U16 u = __builtin_convertvector(h, U16) << 16;
    std::memcpy(&v, &u, sizeof(v));
  }
  return v;
}

// Stores 16 values, rounded as c10::BFloat16(float) rounds (to nearest even, any NaN to 0x7FC0) for
// bfloat16, with integer vector operations.
template <typename S>
__attribute__((always_inline)) inline void store16(S* p, V16 v) {
  if constexpr (std::is_same_v<S, float>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
#if defined(FERCUDA_BN_ACT_AVX512_BF16) && FERCUDA_BN_ACT_AVX512_BF16
    // vcvtneps2bf16 rounds to nearest even as c10 does, but for NaN (it keeps the sign and the
    // payload's top bits; c10 writes 0x7FC0) and float32 denormals (it flushes them to zero; c10
    // rounds them): vectors with such a lane (vfpclassps: quiet or signalling NaN, denormal) take
    // the integer rounding below. Checked against c10 on every float32 bit pattern.
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0x01 | 0x20 | 0x80) == 0, 1)) {
      const __m256bh h = _mm512_cvtneps_pbh(f);
      std::memcpy(p, &h, sizeof(h));
      return;
    }
#endif
    U16 u;
    std::memcpy(&u, &v, sizeof(u));
    const U16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const U16 nan = (U16)(v != v);
    const H16 h = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), H16);
    std::memcpy(p, &h, sizeof(h));
  }
}

__attribute__((always_inline)) inline V16 relu6_16(V16 a) {
  const V16 zero = V16{}, six = zero + 6.0f;
  return a < zero ? zero : (a > six ? six : a);  // NaN propagates, as F.relu6
}

// v where mask is all ones, 0 where it is 0.
__attribute__((always_inline)) inline V16 masked(V16 v, I16 mask) {
  I16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= mask;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// g where 0 < a < 6 (ReLU6 passes the gradient), else 0. On the bits: positive floats order as
// their bits do, so 0 < a < 6 is 1 <= bits <= bits(6) - 1 (excluding +-0, negatives, 6 and above,
// infinities and NaNs), one unsigned comparison. (GCC compiles a select on a float comparison of
// these vectors here, or the AND of two, to per-lane scalar code.)
__attribute__((always_inline)) inline V16 passes_16(V16 a, V16 g) {
  U16 bits;
  std::memcpy(&bits, &a, sizeof(bits));
  return masked(g, (I16)(bits - 1u < 0x40BFFFFFu));
}

// Lanes j >= skip of v, zeros elsewhere: the mask is loaded from a table, not compared.
alignas(64) inline constexpr int32_t kLaneMasks[32] = {0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
                                                       0,  0,  0,  0,  0,  -1, -1, -1, -1, -1, -1,
                                                       -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
__attribute__((always_inline)) inline V16 lanes_from(V16 v, int64_t skip) {
  I16 mask;
  std::memcpy(&mask, kLaneMasks + kLanes16 - skip, sizeof(mask));
  return masked(v, mask);
}

// The lanes' sum as a fixed tree (halves added, four times): deterministic, and a few vector adds
// instead of sixteen dependent scalar ones.
typedef float V8 __attribute__((vector_size(32)));
typedef float V4 __attribute__((vector_size(16)));
__attribute__((always_inline)) inline float sum_lanes(V16 v) {
  const V8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
#pragma GCC diagnostic pop

// ---- Plane runs (NCHW) -----------------------------------------------------------------------
//
// A run goes kLanes values at a time. A run of n >= kLanes values whose last block is partial
// takes the block that ends at its end instead, overlapping the one before: the elementwise loops
// write those outputs twice with the same values, the reductions mask out the overlap. So a 6x6
// plane is three vector blocks, not two and a scalar tail (which cost as much as the rest). Runs
// shorter than kLanes, and float16 / float64 runs, go one value at a time.

// Mean and M2 (sum of squared deviations from the mean) of n >= 1 values: the sum, then the
// deviations from its mean (the run is in cache by then).
template <typename S, typename T>
__attribute__((always_inline)) inline void plane_mean_m2(const S* __restrict x, int64_t n, T* mean, T* m2) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
  if constexpr (kVectorRuns<S>) {
    if (n >= kLanes16) {
      const int64_t full = n / kLanes16 * kLanes16, skip = kLanes16 - (n - full);
      V16 acc = V16{};
      for (int64_t i = 0; i < full; i += kLanes16) acc += load16(x + i);
      if (full < n) acc += lanes_from(load16(x + n - kLanes16), skip);
      const float mu = sum_lanes(acc) / static_cast<float>(n);
      V16 dev = V16{};
      for (int64_t i = 0; i < full; i += kLanes16) {
        const V16 d = load16(x + i) - mu;
        dev += d * d;
      }
      if (full < n) {
        const V16 d = lanes_from(load16(x + n - kLanes16) - mu, skip);
        dev += d * d;
      }
      *mean = mu;
      *m2 = sum_lanes(dev);
      return;
    }
  }
#pragma GCC diagnostic pop
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += load(x[i]);
  const T mu = acc / static_cast<T>(n);
  T dev = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T d = load(x[i]) - mu;
    dev += d * d;
  }
  *mean = mu;
  *m2 = dev;
}

template <bool kRelu6, bool kResidual, typename S, typename T>
__attribute__((always_inline)) inline T apply_one(S x, const S* r, T scale, T shift) {
  T a = load(x) * scale + shift;
  if constexpr (kRelu6) a = bn_act::act(a, true);
  if constexpr (kResidual) a += load(*r);
  return a;
}

// y = act(x * scale + shift) (+ r).
template <bool kRelu6, bool kResidual, typename S, typename T>
__attribute__((always_inline)) inline void plane_apply(const S* __restrict x, const S* __restrict r, int64_t n,
                                                       T scale, T shift, S* __restrict y) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
  if constexpr (kVectorRuns<S>) {
    if (n >= kLanes16) {
      auto block = [&](int64_t i) __attribute__((always_inline)) {
        V16 a = load16(x + i) * scale + shift;
        if constexpr (kRelu6) a = relu6_16(a);
        if constexpr (kResidual) a += load16(r + i);
        store16(y + i, a);
      };
      const int64_t full = n / kLanes16 * kLanes16;
      for (int64_t i = 0; i < full; i += kLanes16) block(i);
      if (full < n) block(n - kLanes16);
      return;
    }
  }
#pragma GCC diagnostic pop
  for (int64_t j = 0; j < n; ++j)
    y[j] = store<S>(apply_one<kRelu6, kResidual, S, T>(x[j], kResidual ? r + j : nullptr, scale, shift));
}

// sum(ga) and sum(ga * xhat), ga = g where the activation passes it, xhat = (x - mean) * invstd,
// a = x * scale + shift.
template <bool kRelu6, typename S, typename T>
__attribute__((always_inline)) inline void plane_grad_sums(const S* __restrict g, const S* __restrict x, int64_t n,
                                                           T mean, T invstd, T scale, T shift, T* sum_ga,
                                                           T* sum_ga_xhat) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
  if constexpr (kVectorRuns<S>) {
    if (n >= kLanes16) {
      V16 acc_g = V16{}, acc_gx = V16{};
      auto block = [&](int64_t i, int64_t skip) __attribute__((always_inline)) {
        const V16 xv = load16(x + i);
        V16 ga = load16(g + i);
        if constexpr (kRelu6) ga = passes_16(xv * scale + shift, ga);
        ga = lanes_from(ga, skip);
        acc_g += ga;
        acc_gx += ga * ((xv - mean) * invstd);
      };
      const int64_t full = n / kLanes16 * kLanes16;
      for (int64_t i = 0; i < full; i += kLanes16) block(i, 0);
      if (full < n) block(n - kLanes16, kLanes16 - (n - full));
      *sum_ga = sum_lanes(acc_g);
      *sum_ga_xhat = sum_lanes(acc_gx);
      return;
    }
  }
#pragma GCC diagnostic pop
  T acc_g = 0, acc_gx = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T xv = load(x[i]);
    const T ga = bn_act::act_passes(xv * scale + shift, kRelu6) ? load(g[i]) : T(0);
    acc_g += ga;
    acc_gx += ga * ((xv - mean) * invstd);
  }
  *sum_ga = acc_g;
  *sum_ga_xhat = acc_gx;
}

template <bool kRelu6, typename S, typename T>
__attribute__((always_inline)) inline void plane_grad_x(const S* __restrict g, const S* __restrict x, int64_t n,
                                                        T mean, T invstd, T scale, T shift, bn_act::Backward<T> k,
                                                        S* __restrict gx) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
  if constexpr (kVectorRuns<S>) {
    if (n >= kLanes16) {
      auto block = [&](int64_t i) __attribute__((always_inline)) {
        const V16 xv = load16(x + i);
        V16 ga = load16(g + i);
        if constexpr (kRelu6) ga = passes_16(xv * scale + shift, ga);
        store16(gx + i, k.k_ga * ga + k.k_xhat * ((xv - mean) * invstd) + k.k_one);
      };
      const int64_t full = n / kLanes16 * kLanes16;
      for (int64_t i = 0; i < full; i += kLanes16) block(i);
      if (full < n) block(n - kLanes16);
      return;
    }
  }
#pragma GCC diagnostic pop
  for (int64_t i = 0; i < n; ++i) {
    const T xv = load(x[i]);
    const T ga = bn_act::act_passes(xv * scale + shift, kRelu6) ? load(g[i]) : T(0);
    gx[i] = store<S>(bn_act::grad_x(k, ga, (xv - mean) * invstd));
  }
}

// Many plane runs in one call (a call per plane costs as much as a 6x6 plane's work). Runs of
// `chunk` values: run q is chunk q % chunks of plane q / chunks, whose channel is plane % C.
struct PlaneRuns {
  int64_t hw, chunk, chunks, c;
};

// Visits runs [begin, end) in order: f(run, offset of its first value, values, channel). Plane,
// chunk and channel advance by counting (a division per run costs as much as a 6x6 plane's work).
template <typename F>
__attribute__((always_inline)) inline void for_runs(const PlaneRuns& pr, int64_t begin, int64_t end, F f) {
  if (begin >= end) return;
  int64_t plane = begin / pr.chunks, k = begin % pr.chunks, c = plane % pr.c;
  for (int64_t q = begin; q < end; ++q) {
    f(q, plane * pr.hw + k * pr.chunk, std::min(pr.chunk, pr.hw - k * pr.chunk), c);
    if (++k == pr.chunks) {
      k = 0;
      ++plane;
      if (++c == pr.c) c = 0;
    }
  }
}

// Planes [begin, end): f(plane, channel).
template <typename F>
__attribute__((always_inline)) inline void for_planes(int64_t C, int64_t begin, int64_t end, F f) {
  if (begin >= end) return;
  int64_t c = begin % C;
  for (int64_t p = begin; p < end; ++p) {
    f(p, c);
    if (++c == C) c = 0;
  }
}

template <typename S, typename T>
void runs_mean_m2(const S* __restrict x, PlaneRuns pr, int64_t begin, int64_t end, T* __restrict mean,
                  T* __restrict m2) {
  for_runs(pr, begin, end, [&](int64_t q, int64_t off, int64_t n, int64_t) __attribute__((always_inline)) {
    plane_mean_m2<S, T>(x + off, n, mean + q, m2 + q);
  });
}

template <bool kRelu6, typename S, typename T>
void planes_apply(const S* __restrict x, const S* __restrict r, int64_t hw, int64_t C, int64_t begin, int64_t end,
                  const T* __restrict scale, const T* __restrict shift, S* __restrict y) {
  for_planes(C, begin, end, [&](int64_t p, int64_t c) __attribute__((always_inline)) {
    const int64_t off = p * hw;
    if (r) {
      plane_apply<kRelu6, true, S, T>(x + off, r + off, hw, scale[c], shift[c], y + off);
    } else {
      plane_apply<kRelu6, false, S, T>(x + off, nullptr, hw, scale[c], shift[c], y + off);
    }
  });
}

template <bool kRelu6, typename S, typename T>
void runs_grad_sums(const S* __restrict g, const S* __restrict x, PlaneRuns pr, int64_t begin, int64_t end,
                    const T* __restrict mean, const T* __restrict invstd, const T* __restrict scale,
                    const T* __restrict shift, T* __restrict sum_ga, T* __restrict sum_ga_xhat) {
  for_runs(pr, begin, end, [&](int64_t q, int64_t off, int64_t n, int64_t c) __attribute__((always_inline)) {
    plane_grad_sums<kRelu6, S, T>(g + off, x + off, n, mean[c], invstd[c], scale[c], shift[c], sum_ga + q,
                                  sum_ga_xhat + q);
  });
}

template <bool kRelu6, typename S, typename T>
void planes_grad_x(const S* __restrict g, const S* __restrict x, int64_t hw, int64_t C, int64_t begin, int64_t end,
                   const T* __restrict mean, const T* __restrict invstd, const T* __restrict scale,
                   const T* __restrict shift, const bn_act::Backward<T>* __restrict k, S* __restrict gx) {
  for_planes(C, begin, end, [&](int64_t p, int64_t c) __attribute__((always_inline)) {
    const int64_t off = p * hw;
    plane_grad_x<kRelu6, S, T>(g + off, x + off, hw, mean[c], invstd[c], scale[c], shift[c], k[c], gx + off);
  });
}

// ---- Row runs (channels_last) ----------------------------------------------------------------
//
// A "row" here is a run of C values, one per channel; with few channels the caller passes `tile`
// image rows at once as one row of tile * C values, the per-channel arrays repeated tile times.
// Float32 and bfloat16 rows of at least 16 values go 16 channels at a time, the last block
// overlapping the one before as in the plane runs (its counted lanes masked out of the sums);
// others one value at a time.

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// f(i, skip) for each block of 16 values of a row of len >= 16: skip lanes already visited.
template <typename F>
__attribute__((always_inline)) inline void for_blocks(int64_t len, F f) {
  const int64_t full = len / kLanes16 * kLanes16;
  for (int64_t i = 0; i < full; i += kLanes16) f(i, int64_t{0});
  if (full < len) f(len - kLanes16, kLanes16 - (len - full));
}

__attribute__((always_inline)) inline V16 at16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void put16(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }

template <typename S, typename T>
constexpr bool kVectorRows = kVectorRuns<S> && std::is_same_v<T, float>;

// Per-channel mean and M2 of `rows` >= 1 rows of C values.
template <typename S, typename T>
void rows_mean_m2(const S* __restrict x, int64_t rows, int64_t C, T* __restrict mean,
                                      T* __restrict m2) {
  for (int64_t c = 0; c < C; ++c) mean[c] = T(0), m2[c] = T(0);
  const T inv = T(1) / static_cast<T>(rows);
  if constexpr (kVectorRows<S, T>) {
    if (C >= kLanes16) {
      for (int64_t r = 0; r < rows; ++r)
        for_blocks(C, [&](int64_t i, int64_t skip) __attribute__((always_inline)) {
          put16(mean + i, at16(mean + i) + lanes_from(load16(x + r * C + i), skip));
        });
      for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
      for (int64_t r = 0; r < rows; ++r)
        for_blocks(C, [&](int64_t i, int64_t skip) __attribute__((always_inline)) {
          const V16 d = lanes_from(load16(x + r * C + i) - at16(mean + i), skip);
          put16(m2 + i, at16(m2 + i) + d * d);
        });
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const S* row = x + r * C;
    for (int64_t c = 0; c < C; ++c) mean[c] += load(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  for (int64_t r = 0; r < rows; ++r) {
    const S* row = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const T d = load(row[c]) - mean[c];
      m2[c] += d * d;
    }
  }
}

template <bool kRelu6, typename S, typename T>
void rows_apply(const S* __restrict x, const S* __restrict r, int64_t rows, int64_t C,
                                    const T* __restrict scale, const T* __restrict shift, S* __restrict y) {
  if constexpr (kVectorRows<S, T>) {
    if (C >= kLanes16) {
      for (int64_t p = 0; p < rows; ++p) {
        const int64_t o = p * C;
        for_blocks(C, [&](int64_t i, int64_t) __attribute__((always_inline)) {
          V16 a = load16(x + o + i) * at16(scale + i) + at16(shift + i);
          if constexpr (kRelu6) a = relu6_16(a);
          if (r) a += load16(r + o + i);
          store16(y + o + i, a);
        });
      }
      return;
    }
  }
  for (int64_t p = 0; p < rows; ++p) {
    const int64_t o = p * C;
    for (int64_t c = 0; c < C; ++c) {
      T a = load(x[o + c]) * scale[c] + shift[c];
      if constexpr (kRelu6) a = bn_act::act(a, true);
      if (r) a += load(r[o + c]);
      y[o + c] = store<S>(a);
    }
  }
}

// Per-channel sum(ga) and sum(ga * xhat) over `rows` rows, written to sum_ga / sum_ga_xhat.
template <bool kRelu6, typename S, typename T>
void rows_grad_sums(const S* __restrict g, const S* __restrict x, int64_t rows, int64_t C,
                                        const T* __restrict mean, const T* __restrict invstd,
                                        const T* __restrict scale, const T* __restrict shift,
                                        T* __restrict sum_ga, T* __restrict sum_ga_xhat) {
  for (int64_t c = 0; c < C; ++c) sum_ga[c] = T(0), sum_ga_xhat[c] = T(0);
  if constexpr (kVectorRows<S, T>) {
    if (C >= kLanes16) {
      for (int64_t p = 0; p < rows; ++p) {
        const int64_t o = p * C;
        for_blocks(C, [&](int64_t i, int64_t skip) __attribute__((always_inline)) {
          const V16 xv = load16(x + o + i);
          V16 ga = load16(g + o + i);
          if constexpr (kRelu6) ga = passes_16(xv * at16(scale + i) + at16(shift + i), ga);
          ga = lanes_from(ga, skip);
          put16(sum_ga + i, at16(sum_ga + i) + ga);
          put16(sum_ga_xhat + i, at16(sum_ga_xhat + i) + ga * ((xv - at16(mean + i)) * at16(invstd + i)));
        });
      }
      return;
    }
  }
  for (int64_t p = 0; p < rows; ++p) {
    const S* xr = x + p * C;
    const S* gr = g + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const T xv = load(xr[c]);
      const T ga = bn_act::act_passes(xv * scale[c] + shift[c], kRelu6) ? load(gr[c]) : T(0);
      sum_ga[c] += ga;
      sum_ga_xhat[c] += ga * ((xv - mean[c]) * invstd[c]);
    }
  }
}

// gx = k_ga * ga + k_xhat * xhat + k_one, the coefficients as (C,) arrays.
template <bool kRelu6, typename S, typename T>
void rows_grad_x(const S* __restrict g, const S* __restrict x, int64_t rows, int64_t C,
                                     const T* __restrict mean, const T* __restrict invstd, const T* __restrict scale,
                                     const T* __restrict shift, const T* __restrict k_ga,
                                     const T* __restrict k_xhat, const T* __restrict k_one, S* __restrict gx) {
  if constexpr (kVectorRows<S, T>) {
    if (C >= kLanes16) {
      for (int64_t p = 0; p < rows; ++p) {
        const int64_t o = p * C;
        for_blocks(C, [&](int64_t i, int64_t) __attribute__((always_inline)) {
          const V16 xv = load16(x + o + i);
          V16 ga = load16(g + o + i);
          if constexpr (kRelu6) ga = passes_16(xv * at16(scale + i) + at16(shift + i), ga);
          store16(gx + o + i, at16(k_ga + i) * ga + at16(k_xhat + i) * ((xv - at16(mean + i)) * at16(invstd + i)) +
                                  at16(k_one + i));
        });
      }
      return;
    }
  }
  for (int64_t p = 0; p < rows; ++p) {
    const S* xr = x + p * C;
    const S* gr = g + p * C;
    S* out = gx + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const T xv = load(xr[c]);
      const T ga = bn_act::act_passes(xv * scale[c] + shift[c], kRelu6) ? load(gr[c]) : T(0);
      out[c] = store<S>(k_ga[c] * ga + k_xhat[c] * ((xv - mean[c]) * invstd[c]) + k_one[c]);
    }
  }
}
#pragma GCC diagnostic pop

}  // namespace
}  // namespace bn_act_cpu
}  // namespace fercuda

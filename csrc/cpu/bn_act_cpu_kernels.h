// Loops of the BatchNorm + ReLU6 (or identity) + residual add CPU ops (bn_act_cpu.cpp): plain
// C++ on pointers, no ATen. S is the tensor's storage type (float, double, c10::Half,
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

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fercuda/bn_act_math.h"

// The hot loops are compiled for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the baseline; the
// loader picks the clone the CPU runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define FERCUDA_BN_ACT_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FERCUDA_BN_ACT_SIMD
#endif

namespace fercuda {
namespace bn_act_cpu {
// Internal linkage: private to bn_act_cpu.cpp, the file that includes it.
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

// ---- Plane runs (NCHW) -----------------------------------------------------------------------

// Mean and M2 (sum of squared deviations from the mean) of n >= 1 values: the sum, then the
// deviations from its mean (the run is in cache by then).
template <typename S, typename T>
FERCUDA_BN_ACT_SIMD void plane_mean_m2(const S* __restrict x, int64_t n, T* mean, T* m2) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += load(x[i + j]);
  for (int64_t j = 0; i + j < n; ++j) acc[j] += load(x[i + j]);
  const T mu = combine_lanes(acc) / static_cast<T>(n);
  T dev[kLanes] = {};
  i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T d = load(x[i + j]) - mu;
      dev[j] += d * d;
    }
  for (int64_t j = 0; i + j < n; ++j) {
    const T d = load(x[i + j]) - mu;
    dev[j] += d * d;
  }
  *mean = mu;
  *m2 = combine_lanes(dev);
}

// y = act(x * scale + shift) (+ r).
template <bool kRelu6, typename S, typename T>
FERCUDA_BN_ACT_SIMD void plane_apply(const S* __restrict x, const S* __restrict r, int64_t n, T scale, T shift,
                                     S* __restrict y) {
  if constexpr (kRelu6) {
    if (r) {
      for (int64_t i = 0; i < n; ++i) y[i] = store<S>(bn_act::act(load(x[i]) * scale + shift, true) + load(r[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) y[i] = store<S>(bn_act::act(load(x[i]) * scale + shift, true));
    }
  } else {
    if (r) {
      for (int64_t i = 0; i < n; ++i) y[i] = store<S>(load(x[i]) * scale + shift + load(r[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) y[i] = store<S>(load(x[i]) * scale + shift);
    }
  }
}

// sum(ga) and sum(ga * xhat), ga = g where the activation passes it, xhat = (x - mean) * invstd,
// a = x * scale + shift.
template <bool kRelu6, typename S, typename T>
FERCUDA_BN_ACT_SIMD void plane_grad_sums(const S* __restrict g, const S* __restrict x, int64_t n, T mean, T invstd,
                                         T scale, T shift, T* sum_ga, T* sum_ga_xhat) {
  T acc_g[kLanes] = {}, acc_gx[kLanes] = {};
  auto step = [&](int64_t i, int64_t j) __attribute__((always_inline)) {
    const T xv = load(x[i]);
    const T a = xv * scale + shift;
    const T ga = bn_act::act_passes(a, kRelu6) ? load(g[i]) : T(0);
    acc_g[j] += ga;
    acc_gx[j] += ga * ((xv - mean) * invstd);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) step(i + j, j);
  for (int64_t j = 0; i + j < n; ++j) step(i + j, j);
  *sum_ga = combine_lanes(acc_g);
  *sum_ga_xhat = combine_lanes(acc_gx);
}

template <bool kRelu6, typename S, typename T>
FERCUDA_BN_ACT_SIMD void plane_grad_x(const S* __restrict g, const S* __restrict x, int64_t n, T mean, T invstd,
                                      T scale, T shift, bn_act::Backward<T> k, S* __restrict gx) {
  for (int64_t i = 0; i < n; ++i) {
    const T xv = load(x[i]);
    const T a = xv * scale + shift;
    const T ga = bn_act::act_passes(a, kRelu6) ? load(g[i]) : T(0);
    gx[i] = store<S>(bn_act::grad_x(k, ga, (xv - mean) * invstd));
  }
}

// ---- Row runs (channels_last) ----------------------------------------------------------------

// Per-channel mean and M2 of `rows` >= 1 rows of C values.
template <typename S, typename T>
FERCUDA_BN_ACT_SIMD void rows_mean_m2(const S* __restrict x, int64_t rows, int64_t C, T* __restrict mean,
                                      T* __restrict m2) {
  for (int64_t c = 0; c < C; ++c) mean[c] = T(0), m2[c] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const S* row = x + r * C;
    for (int64_t c = 0; c < C; ++c) mean[c] += load(row[c]);
  }
  const T inv = T(1) / static_cast<T>(rows);
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
FERCUDA_BN_ACT_SIMD void rows_apply(const S* __restrict x, const S* __restrict r, int64_t rows, int64_t C,
                                    const T* __restrict scale, const T* __restrict shift,
                                    S* __restrict y) {
  for (int64_t p = 0; p < rows; ++p) {
    const S* xr = x + p * C;
    S* yr = y + p * C;
    if constexpr (kRelu6) {
      if (r) {
        const S* rr = r + p * C;
        for (int64_t c = 0; c < C; ++c)
          yr[c] = store<S>(bn_act::act(load(xr[c]) * scale[c] + shift[c], true) + load(rr[c]));
      } else {
        for (int64_t c = 0; c < C; ++c) yr[c] = store<S>(bn_act::act(load(xr[c]) * scale[c] + shift[c], true));
      }
    } else {
      if (r) {
        const S* rr = r + p * C;
        for (int64_t c = 0; c < C; ++c) yr[c] = store<S>(load(xr[c]) * scale[c] + shift[c] + load(rr[c]));
      } else {
        for (int64_t c = 0; c < C; ++c) yr[c] = store<S>(load(xr[c]) * scale[c] + shift[c]);
      }
    }
  }
}

// Per-channel sum(ga) and sum(ga * xhat) over `rows` rows, written to sum_ga / sum_ga_xhat.
template <bool kRelu6, typename S, typename T>
FERCUDA_BN_ACT_SIMD void rows_grad_sums(const S* __restrict g, const S* __restrict x, int64_t rows, int64_t C,
                                        const T* __restrict mean, const T* __restrict invstd,
                                        const T* __restrict scale, const T* __restrict shift,
                                        T* __restrict sum_ga, T* __restrict sum_ga_xhat) {
  for (int64_t c = 0; c < C; ++c) sum_ga[c] = T(0), sum_ga_xhat[c] = T(0);
  for (int64_t p = 0; p < rows; ++p) {
    const S* xr = x + p * C;
    const S* gr = g + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const T xv = load(xr[c]);
      const T a = xv * scale[c] + shift[c];
      const T ga = bn_act::act_passes(a, kRelu6) ? load(gr[c]) : T(0);
      sum_ga[c] += ga;
      sum_ga_xhat[c] += ga * ((xv - mean[c]) * invstd[c]);
    }
  }
}

// gx = k_ga * ga + k_xhat * xhat + k_one, the coefficients as (C,) arrays.
template <bool kRelu6, typename S, typename T>
FERCUDA_BN_ACT_SIMD void rows_grad_x(const S* __restrict g, const S* __restrict x, int64_t rows, int64_t C,
                                     const T* __restrict mean, const T* __restrict invstd, const T* __restrict scale,
                                     const T* __restrict shift, const T* __restrict k_ga,
                                     const T* __restrict k_xhat, const T* __restrict k_one,
                                     S* __restrict gx) {
  for (int64_t p = 0; p < rows; ++p) {
    const S* xr = x + p * C;
    const S* gr = g + p * C;
    S* out = gx + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const T xv = load(xr[c]);
      const T a = xv * scale[c] + shift[c];
      const T ga = bn_act::act_passes(a, kRelu6) ? load(gr[c]) : T(0);
      out[c] = store<S>(k_ga[c] * ga + k_xhat[c] * ((xv - mean[c]) * invstd[c]) + k_one[c]);
    }
  }
}

}  // namespace
}  // namespace bn_act_cpu
}  // namespace fercuda

// CPU kernels of the fused depthwise 3x3 conv + BatchNorm + ReLU6 (schemas in csrc/ops.cpp).
//
// Layouts. NCHW: one task per (n, c) plane; the plane is widened into a zero-padded
// buffer of the accumulation type (it fits in L1/L2 for this network's sizes) and the
// outputs computed in the "wide" layout (see conv_wide), so the 3x3 loops have no border
// branches and run as one vector loop over the plane. channels_last: one task per
// (n, output row); the loops run along C, contiguous in memory.
//
// Passes over memory (x, y, grad tensors; the (C,) vectors do not count):
//  inference  1 pass:  read x, write y (BatchNorm folded into the conv weights).
//  training   2 passes: the batch statistics must be complete before any output is
//             normalized, so pass 1 computes the conv and reduces per-channel mean / M2
//             (storing nothing), pass 2 recomputes the conv (cheaper than writing and
//             re-reading the pre-BatchNorm tensor) and writes y.
//  backward   training: 2 passes. gz needs sum(ga) and sum(ga * xhat) over the whole
//             batch, so pass 1 recomputes conv -> xhat -> ReLU6 mask from x and reduces
//             them; pass 2 recomputes the same, forms gz, and produces grad_x (transposed
//             depthwise conv) and the grad_weight / grad_bias reductions.
//             frozen BatchNorm (training=False): gz is local, 1 pass.
// channels_last backward: one task per image, the same two passes along C (backward_cl).
//
// Reductions are deterministic: per-plane (per-row) partials land in fixed slots and are
// combined in a fixed order in double precision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "fercuda/checks.h"
#include "fercuda/dwconv_math.h"


namespace fercuda {
namespace {

using dwconv::kTaps;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor as_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Per-channel parameters widened to the accumulation type, in one place.
template <typename T>
struct ChannelParams {
  at::Tensor w;  // (C, 9)
  at::Tensor b, bn_w, bn_b;  // (C,)
};

template <typename T>
at::Tensor widen(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

// dst[i] = src[i] converted (bfloat16 / float16 widened, or narrowed with rounding to nearest).
template <typename From, typename To>
FERCUDA_SIMD void convert_run(const From* __restrict src, int64_t n, To* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<To>(src[i]);
}

// dst[i] = relu6(src[i]), narrowed to the output dtype.
template <typename T, typename To>
FERCUDA_SIMD void relu6_convert_run(const T* __restrict src, int64_t n, To* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<To>(dwconv::relu6(src[i]));
}

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

// ---- Hot loops, on the accumulation type only (so one AVX2 clone serves every dtype) ----

// NCHW planes are processed in a "wide" layout: output (oy, ox) lives at k = oy * wp + ox,
// wp being the padded plane's row length, so a tap (ky, kx) reads the padded plane at
// k * stride + ky * wp + kx for every output and each loop runs over the whole plane at
// once: long vector loops even for the network's 6x6 planes. Entries with ox >= w_out are
// scratch (the last row has none); the backward gives them a zero gradient.
template <typename T>
FERCUDA_SIMD void conv_wide(const T* __restrict xp, int64_t wp, const T* __restrict w, T shift, int64_t stride,
                            int64_t len, T* __restrict z) {
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  const T* r0 = xp;
  const T* r1 = xp + wp;
  const T* r2 = xp + 2 * wp;
  if (stride == 1) {
    for (int64_t k = 0; k < len; ++k) {
      z[k] = shift + r0[k] * w0 + r0[k + 1] * w1 + r0[k + 2] * w2 + r1[k] * w3 + r1[k + 1] * w4 + r1[k + 2] * w5 +
             r2[k] * w6 + r2[k + 1] * w7 + r2[k + 2] * w8;
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = 2 * k;
      z[k] = shift + r0[i] * w0 + r0[i + 1] * w1 + r0[i + 2] * w2 + r1[i] * w3 + r1[i + 1] * w4 + r1[i + 2] * w5 +
             r2[i] * w6 + r2[i + 1] * w7 + r2[i + 2] * w8;
    }
  }
}

// out[oy][ox] = relu6(z[oy * wp + ox]), narrowed to the output dtype. Narrow planes
// (the network's 6x6 and 12x12) go through an index table, one long (gather) loop, rather
// than rows too short to vectorize.
template <typename T, typename scalar_t>
FERCUDA_SIMD void store_relu6_wide(const T* __restrict z, int64_t wp, int64_t h_out, int64_t w_out,
                                   const int32_t* __restrict index, scalar_t* __restrict out) {
  if (index != nullptr) {
    const int64_t n = h_out * w_out;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(dwconv::relu6(z[index[i]]));
    return;
  }
  for (int64_t oy = 0; oy < h_out; ++oy) {
    const T* zr = z + oy * wp;
    scalar_t* o = out + oy * w_out;
    for (int64_t ox = 0; ox < w_out; ++ox) o[ox] = static_cast<scalar_t>(dwconv::relu6(zr[ox]));
  }
}

// dst[i] = src[index[i]]: the interior of a padded plane, narrowed to the tensor's dtype.
template <typename T, typename scalar_t>
FERCUDA_SIMD void gather_plane(const T* __restrict src, const int32_t* __restrict index, int64_t n,
                               scalar_t* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[index[i]]);
}

// 32-byte vectors (one AVX2 register; two SSE registers in the default clone).
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
// AVX vectors in the default clone's ABI does not apply).
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
// Floating-point sums do not vectorize unless reordered; kLanes independent partial sums,
// combined in a fixed order at the end, let the compiler use full vectors and keep the
// result deterministic.
constexpr int64_t kLanes = 16;

template <typename T>
T combine_lanes(const T* acc, T tail) {
  for (int64_t j = 0; j < kLanes; ++j) tail += acc[j];
  return tail;
}

// Mean and sum of squared deviations of one wide plane's outputs, valid[k] being 1 for
// outputs and 0 for scratch entries (two passes over L1-resident data: no cancellation,
// unlike sum and sum of squares).
template <typename T>
FERCUDA_SIMD void mean_m2_wide(const T* __restrict z, const T* __restrict valid, int64_t len, int64_t count,
                               double& mean, double& m2) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += z[k + j] * valid[k + j];
  T tail = 0;
  for (; k < len; ++k) tail += z[k] * valid[k];
  const T mu = combine_lanes(acc, tail) / static_cast<T>(count);
  T acc2[kLanes] = {};
  for (k = 0; k + kLanes <= len; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T d = (z[k + j] - mu) * valid[k + j];
      acc2[j] += d * d;
    }
  tail = 0;
  for (; k < len; ++k) {
    const T d = (z[k] - mu) * valid[k];
    tail += d * d;
  }
  mean = mu;
  m2 = combine_lanes(acc2, tail);
}

// channels_last rows: (W, C) arrays of the accumulation type; in conv_row_cl_fused, three
// input rows (a null row is zero padding) give one output row (shift[c] + 3x3 window, then
// ReLU6 when kRelu6) written straight to out[ox][c], the taps summed in order (ky, then kx).

constexpr int kClVecs = 4;
template <typename T>
constexpr int64_t kClBlockOf = kClVecs * kVecLen<T>;

// out[c] = shift[c] + sum over the n_taps pairs of xs[t][c] * ws[t][c] (then ReLU6 when
// kRelu6), for all channels: blocks of kClVecs vectors stay in registers across the taps, so
// each output is stored once and never re-read; the taps are summed in the order given.
template <typename T, bool kRelu6>
__attribute__((always_inline)) inline void taps_dot_cl(const T* const* xs, const T* const* ws, int n_taps,
                                                       const T* __restrict shift, int64_t channels,
                                                       T* __restrict out) {
  constexpr int64_t kClBlock = kClBlockOf<T>;
  int64_t c0 = 0;
  for (; c0 + kClBlock <= channels; c0 += kClBlock) {
    Vec<T> acc[kClVecs];
    for (int v = 0; v < kClVecs; ++v) acc[v] = load_vec(shift + c0 + v * kVecLen<T>);
    for (int t = 0; t < n_taps; ++t)
      for (int v = 0; v < kClVecs; ++v)
        acc[v] += load_vec(xs[t] + c0 + v * kVecLen<T>) * load_vec(ws[t] + c0 + v * kVecLen<T>);
    for (int v = 0; v < kClVecs; ++v) {
      Vec<T> a = acc[v];
      if constexpr (kRelu6) {
        // relu6 lane by lane, as dwconv::relu6 (NaN propagates).
        const Vec<T> zero = Vec<T>{}, six = zero + T(6);
        a = a < zero ? zero : (a > six ? six : a);
      }
      store_vec(out + c0 + v * kVecLen<T>, a);
    }
  }
  for (; c0 < channels; ++c0) {
    T acc = shift[c0];
    for (int t = 0; t < n_taps; ++t) acc += xs[t][c0] * ws[t][c0];
    out[c0] = kRelu6 ? dwconv::relu6(acc) : acc;
  }
}

template <typename T, bool kRelu6>
FERCUDA_SIMD void conv_row_cl_fused(const T* const rows[3], int64_t width, int64_t channels, int64_t padding,
                                    int64_t stride, const T* __restrict w9c, const T* __restrict shift, int64_t w_out,
                                    T* __restrict out) {
  for (int64_t ox = 0; ox < w_out; ++ox) {
    const T* xs[kTaps];
    const T* ws[kTaps];
    int n_taps = 0;
    for (int ky = 0; ky < 3; ++ky) {
      if (rows[ky] == nullptr) continue;
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t ix = ox * stride - padding + kx;
        if (ix < 0 || ix >= width) continue;
        xs[n_taps] = rows[ky] + ix * channels;
        ws[n_taps] = w9c + (ky * 3 + kx) * channels;
        ++n_taps;
      }
    }
    taps_dot_cl<T, kRelu6>(xs, ws, n_taps, shift, channels, out + ox * channels);
  }
}

// channels_last backward, one input row iy of grad_x: the transposed conv written as a gather,
// gx[ix][c] = sum over the taps (ky, kx) that put input (iy, ix) under an output (oy, ox) of
// gz[oy][ox][c] * w[ky][kx][c]; gz is the image's (H_out, W_out, C) gradient, zeros a (C,)
// vector of zeros.
template <typename T>
FERCUDA_SIMD void grad_input_row_cl(const T* __restrict gz, int64_t h_out, int64_t w_out, int64_t iy, int64_t width,
                                    int64_t channels, int64_t padding, int64_t stride, const T* __restrict w9c,
                                    const T* __restrict zeros, T* __restrict out) {
  // stride is 1 or 2: shifts and masks, not divisions, in this per-pixel loop.
  const int64_t shift = stride == 2 ? 1 : 0, odd = stride - 1;
  for (int64_t ix = 0; ix < width; ++ix) {
    const T* gs[kTaps];
    const T* ws[kTaps];
    int n_taps = 0;
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t ny = iy + padding - ky;
      if (ny < 0 || (ny & odd) != 0 || (ny >> shift) >= h_out) continue;
      const int64_t oy = ny >> shift;
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t nx = ix + padding - kx;
        if (nx < 0 || (nx & odd) != 0 || (nx >> shift) >= w_out) continue;
        gs[n_taps] = gz + (oy * w_out + (nx >> shift)) * channels;
        ws[n_taps] = w9c + (ky * 3 + kx) * channels;
        ++n_taps;
      }
    }
    taps_dot_cl<T, false>(gs, ws, n_taps, zeros, channels, out + ix * channels);
  }
}

// channels_last backward, one output row: from the conv row z[ox][c] and the gradient row
// g[ox][c], per channel the ReLU6 mask, xhat, the row's sums of ga and ga * xhat and, when
// kGz, gz[ox][c] and its row sum. k holds the (C,) vectors k_ga, k_xhat, k_one of
// dwconv::BNBackward.
template <typename T, bool kGz>
FERCUDA_SIMD void bn_relu6_grad_row_cl(const T* __restrict z, const T* __restrict g, int64_t w_out, int64_t channels,
                                       const T* __restrict mu, const T* __restrict is, const T* __restrict bw,
                                       const T* __restrict bb, const T* __restrict k_ga, const T* __restrict k_xhat,
                                       const T* __restrict k_one, T* __restrict gz, T* __restrict sum_ga,
                                       T* __restrict sum_gx, T* __restrict sum_gz) {
  // One vector of channels at a time, its sums in registers across the row; written with
  // vector types because the mask's two comparisons keep the compiler from vectorizing.
  constexpr int64_t kV = kVecLen<T>;
  const Vec<T> zero = Vec<T>{}, six = zero + T(6);
  int64_t c0 = 0;
  for (; c0 + kV <= channels; c0 += kV) {
    const Vec<T> m = load_vec(mu + c0), s = load_vec(is + c0), w = load_vec(bw + c0), bias = load_vec(bb + c0);
    Vec<T> kg = zero, kx = zero, k1 = zero;
    if constexpr (kGz) kg = load_vec(k_ga + c0), kx = load_vec(k_xhat + c0), k1 = load_vec(k_one + c0);
    Vec<T> s_ga = zero, s_gx = zero, s_gz = zero;
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const Vec<T> xhat = (load_vec(z + ox * channels + c0) - m) * s;
      const Vec<T> a = w * xhat + bias;
      const Vec<T> ga = ((a > zero) & (a < six)) ? load_vec(g + ox * channels + c0) : zero;
      s_ga += ga;
      s_gx += ga * xhat;
      if constexpr (kGz) {
        const Vec<T> d = kg * ga + kx * xhat + k1;
        store_vec(gz + ox * channels + c0, d);
        s_gz += d;
      }
    }
    store_vec(sum_ga + c0, s_ga);
    store_vec(sum_gx + c0, s_gx);
    if constexpr (kGz) store_vec(sum_gz + c0, s_gz);
  }
  for (; c0 < channels; ++c0) {
    T s_ga = 0, s_gx = 0, s_gz = 0;
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const T xhat = (z[ox * channels + c0] - mu[c0]) * is[c0];
      const T a = bw[c0] * xhat + bb[c0];
      const T ga = dwconv::relu6_passes(a) ? g[ox * channels + c0] : T(0);
      s_ga += ga;
      s_gx += ga * xhat;
      if constexpr (kGz) {
        const T d = k_ga[c0] * ga + k_xhat[c0] * xhat + k_one[c0];
        gz[ox * channels + c0] = d;
        s_gz += d;
      }
    }
    sum_ga[c0] = s_ga;
    sum_gx[c0] = s_gx;
    if constexpr (kGz) sum_gz[c0] = s_gz;
  }
}

// channels_last backward, one output row: gw[tap][c] = sum over the row of gz[ox][c] times
// the input under that tap (rows as in conv_row_cl_fused). Channels go one vector at a time,
// its nine tap sums held in registers across the whole row.
template <typename T>
FERCUDA_SIMD void grad_weight_row_cl(const T* const rows[3], int64_t width, int64_t channels, int64_t padding,
                                     int64_t stride, const T* __restrict gz, int64_t w_out, T* __restrict gw) {
  constexpr int64_t kV = kVecLen<T>;
  int64_t c0 = 0;
  for (; c0 + kV <= channels; c0 += kV) {
    Vec<T> acc[kTaps] = {};
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const Vec<T> gv = load_vec(gz + ox * channels + c0);
      const int64_t ix0 = ox * stride - padding;
      for (int ky = 0; ky < 3; ++ky) {
        if (rows[ky] == nullptr) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ix = ix0 + kx;
          if (ix < 0 || ix >= width) continue;
          acc[ky * 3 + kx] += gv * load_vec(rows[ky] + ix * channels + c0);
        }
      }
    }
    for (int t = 0; t < kTaps; ++t) store_vec(gw + t * channels + c0, acc[t]);
  }
  for (; c0 < channels; ++c0) {
    T acc[kTaps] = {};
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const T gv = gz[ox * channels + c0];
      for (int ky = 0; ky < 3; ++ky) {
        if (rows[ky] == nullptr) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ix = ox * stride - padding + kx;
          if (ix >= 0 && ix < width) acc[ky * 3 + kx] += gv * rows[ky][ix * channels + c0];
        }
      }
    }
    for (int t = 0; t < kTaps; ++t) gw[t * channels + c0] = acc[t];
  }
}

// channels_last: per-channel mean and M2 over the w_out pixels of one row z[ox][c].
template <typename T>
FERCUDA_SIMD void row_mean_m2_cl(const T* __restrict z, int64_t w_out, int64_t channels, T* __restrict mean,
                                 T* __restrict m2) {
  for (int64_t c = 0; c < channels; ++c) mean[c] = 0;
  for (int64_t ox = 0; ox < w_out; ++ox)
    for (int64_t c = 0; c < channels; ++c) mean[c] += z[ox * channels + c];
  const T inv = T(1) / static_cast<T>(w_out);
  for (int64_t c = 0; c < channels; ++c) mean[c] *= inv;
  for (int64_t c = 0; c < channels; ++c) m2[c] = 0;
  for (int64_t ox = 0; ox < w_out; ++ox)
    for (int64_t c = 0; c < channels; ++c) {
      const T d = z[ox * channels + c] - mean[c];
      m2[c] += d * d;
    }
}

// Backward, elementwise on one wide plane: from z and g (zero in the scratch entries), the
// ReLU6 mask and xhat; the sums of ga and ga * xhat; gz where wanted.
template <typename T>
FERCUDA_SIMD void bn_relu6_grad_wide(const T* __restrict z, const T* __restrict g, int64_t len, T mean, T invstd,
                                     T bn_w, T bn_b, dwconv::BNBackward<T> k, T* __restrict gz, T& sum_ga,
                                     T& sum_ga_xhat) {
  T acc_ga[kLanes] = {}, acc_gx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T xhat = (z[i + j] - mean) * invstd;
      const T a = bn_w * xhat + bn_b;
      const T ga = dwconv::relu6_passes(a) ? g[i + j] : T(0);
      acc_ga[j] += ga;
      acc_gx[j] += ga * xhat;
      if (gz != nullptr) gz[i + j] = dwconv::grad_z(k, ga, xhat);
    }
  T t_ga = 0, t_gx = 0;
  for (; i < len; ++i) {
    const T xhat = (z[i] - mean) * invstd;
    const T a = bn_w * xhat + bn_b;
    const T ga = dwconv::relu6_passes(a) ? g[i] : T(0);
    t_ga += ga;
    t_gx += ga * xhat;
    if (gz != nullptr) gz[i] = dwconv::grad_z(k, ga, xhat);
  }
  sum_ga = combine_lanes(acc_ga, t_ga);
  sum_ga_xhat = combine_lanes(acc_gx, t_gx);
}

template <typename T>
FERCUDA_SIMD T sum_of(const T* __restrict v, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += v[i + j];
  T tail = 0;
  for (; i < n; ++i) tail += v[i];
  return combine_lanes(acc, tail);
}

// grad_w[tap] = sum over the wide plane of gz * the input under that tap.
template <typename T>
FERCUDA_SIMD void grad_weight_wide(const T* __restrict xp, int64_t wp, const T* __restrict gz, int64_t stride,
                                   int64_t len, T* __restrict gw) {
  if (stride == 1) {
    // All nine taps in one sweep, one vector accumulator each: gz is read once, and the
    // network's small planes (a few vectors long) pay one loop instead of nine.
    constexpr int64_t kV = kVecLen<T>;
    Vec<T> acc[kTaps] = {};
    for (int64_t k = 0; k < len; k += kV) {  // len is a multiple of kLanes
      const Vec<T> gv = load_vec(gz + k);
      for (int t = 0; t < kTaps; ++t) acc[t] += gv * load_vec(xp + (t / 3) * wp + (t % 3) + k);
    }
    for (int t = 0; t < kTaps; ++t) {
      T lanes[kV];
      store_vec(lanes, acc[t]);
      for (int64_t half = kV / 2; half >= 1; half /= 2)
        for (int64_t j = 0; j < half; ++j) lanes[j] += lanes[j + half];
      gw[t] = lanes[0];
    }
    return;
  }
  for (int t = 0; t < kTaps; ++t) {
    const T* r = xp + (t / 3) * wp + (t % 3);
    T acc[kLanes] = {};
    T tail = 0;
    int64_t k = 0;
    if (stride == 1) {
      for (; k + kLanes <= len; k += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) acc[j] += gz[k + j] * r[k + j];
      for (; k < len; ++k) tail += gz[k] * r[k];
    } else {
      for (; k + kLanes <= len; k += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) acc[j] += gz[k + j] * r[2 * (k + j)];
      for (; k < len; ++k) tail += gz[k] * r[2 * k];
    }
    gw[t] = combine_lanes(acc, tail);
  }
}

// Transposed depthwise conv: scatter gz * w into the padded plane gxp (zeroed by the caller).
template <typename T>
FERCUDA_SIMD void grad_input_wide(const T* __restrict gz, const T* __restrict w, int64_t stride, int64_t len,
                                  int64_t wp, T* __restrict gxp) {
  for (int t = 0; t < kTaps; ++t) {
    T* r = gxp + (t / 3) * wp + (t % 3);
    const T wt = w[t];
    if (stride == 1) {
      for (int64_t k = 0; k < len; ++k) r[k] += gz[k] * wt;
    } else {
      for (int64_t k = 0; k < len; ++k) r[2 * k] += gz[k] * wt;
    }
  }
}

// Stride 1, as a gather: gxp[p] = sum over taps of w[t] * gz[p - offset(t)], one sweep
// writing each entry of the padded plane once (no zeroing, no nine read-modify-write
// passes). gz must be readable, and zero, from gz - (2 * wp + 2) to gz + len_padded + kV.
template <typename T>
FERCUDA_SIMD void grad_input_gather_wide(const T* __restrict gz, const T* __restrict w, int64_t wp,
                                         int64_t len_padded, T* __restrict gxp) {
  constexpr int64_t kV = kVecLen<T>;
  for (int64_t p = 0; p < len_padded; p += kV) {
    Vec<T> acc = {};
    for (int t = 0; t < kTaps; ++t) acc += load_vec(gz + p - (t / 3) * wp - (t % 3)) * w[t];
    store_vec(gxp + p, acc);
  }
}

#pragma GCC diagnostic pop

// ---- Plane / row drivers ------------------------------------------------------------

struct Geometry {
  int64_t n, c, h, w, h_out, w_out, stride, padding;
  int64_t hp() const { return h + 2 * padding; }
  int64_t wp() const { return w + 2 * padding; }
};

// Buffers of one padded plane or one wide plane: their border / scratch entries are
// zeroed here once and never written again.
template <typename T>
std::vector<T> padded_buffer(const Geometry& g) {
  // The slack covers the reads and writes of the entries past the last output (wide_len).
  return std::vector<T>(g.hp() * g.wp() + 2 * kLanes, T(0));
}

// Entries up to the last output, then up to a multiple of kLanes so that no loop over a
// wide plane has a scalar tail (the network's 6x6 planes would spend most time there).
int64_t wide_outputs_end(const Geometry& g) { return (g.h_out - 1) * g.wp() + g.w_out; }
int64_t wide_len(const Geometry& g) { return (wide_outputs_end(g) + kLanes - 1) / kLanes * kLanes; }

// Narrow planes are stored through index tables (see store_relu6_wide).
bool narrow_plane(const Geometry& g) { return g.w_out < 16; }

// index[oy * cols + ox] = (oy + offset) * row_len + ox + offset.
std::vector<int32_t> plane_index(int64_t rows, int64_t cols, int64_t row_len, int64_t offset) {
  std::vector<int32_t> index(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) index[r * cols + c] = static_cast<int32_t>((r + offset) * row_len + c + offset);
  return index;
}

// Widens one (H, W) plane into the interior of the zero-padded buffer xp.
template <typename scalar_t, typename T>
void load_padded_plane(const scalar_t* x, const Geometry& g, T* xp) {
  for (int64_t y = 0; y < g.h; ++y) {
    T* row = xp + (y + g.padding) * g.wp() + g.padding;
    const scalar_t* src = x + y * g.w;
    for (int64_t i = 0; i < g.w; ++i) row[i] = static_cast<T>(src[i]);
  }
}

// Widens one (H_out, W_out) plane into the wide buffer gw (scratch entries stay zero).
template <typename scalar_t, typename T>
void load_wide_plane(const scalar_t* src, const Geometry& g, T* wide) {
  for (int64_t oy = 0; oy < g.h_out; ++oy)
    for (int64_t ox = 0; ox < g.w_out; ++ox) wide[oy * g.wp() + ox] = static_cast<T>(src[oy * g.w_out + ox]);
}

// y = relu6(conv(x, w_folded) + shift), NCHW, one pass.
template <typename scalar_t, typename T>
void affine_relu6_nchw(const at::Tensor& x, const T* w_folded, const T* shift, const Geometry& g, at::Tensor& y) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  const int64_t plane_in = g.h * g.w, plane_out = g.h_out * g.w_out;
  const int64_t len = wide_len(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp = padded_buffer<T>(g), z(len);
    const std::vector<int32_t> index = narrow_plane(g) ? plane_index(g.h_out, g.w_out, g.wp(), 0)
                                                       : std::vector<int32_t>();
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % g.c;
      load_padded_plane(xd + p * plane_in, g, xp.data());
      conv_wide(xp.data(), g.wp(), w_folded + c * kTaps, shift[c], g.stride, len, z.data());
      store_relu6_wide(z.data(), g.wp(), g.h_out, g.w_out, index.empty() ? nullptr : index.data(),
                       yd + p * plane_out);
    }
  });
}

// channels_last: the three input rows under output row oy, as T (null = padding row).
template <typename scalar_t, typename T>
void rows_under(const scalar_t* img, const Geometry& g, int64_t oy, std::vector<T>& buf, const T* rows[3]) {
  const int64_t row_len = g.w * g.c;
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * g.stride - g.padding + ky;
    rows[ky] = (iy < 0 || iy >= g.h) ? nullptr : load_as(img + iy * row_len, row_len, buf.data() + ky * row_len);
  }
}

// channels_last: visits every output row (n, oy) with its conv output z[ox][c] =
// shift[c] + sum of w9c taps; fn(row_index, z).
template <typename scalar_t, typename T, typename Fn>
void for_each_conv_row_cl(const at::Tensor& x, const T* w9c, const T* shift, const Geometry& g, Fn fn) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.n * g.h_out, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(std::is_same_v<scalar_t, T> ? 0 : 3 * g.w * g.c), z(g.w_out * g.c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.h_out, oy = r % g.h_out;
      const T* rows[3];
      rows_under(xd + n * g.h * g.w * g.c, g, oy, buf, rows);
      conv_row_cl_fused<T, false>(rows, g.w, g.c, g.padding, g.stride, w9c, shift, g.w_out, z.data());
      fn(r, z.data());
    }
  });
}

template <typename scalar_t, typename T>
void affine_relu6_cl(const at::Tensor& x, const T* w9c, const T* shift, const Geometry& g, at::Tensor& y) {
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  const int64_t row_out = g.w_out * g.c;
  if constexpr (std::is_same_v<scalar_t, T>) {
    // The output row is written once, straight from registers: no z row, no second pass.
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.n * g.h_out, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.h_out, oy = r % g.h_out;
        const T* rows[3];
        rows_under(xd + n * g.h * g.w * g.c, g, oy, buf, rows);
        conv_row_cl_fused<T, true>(rows, g.w, g.c, g.padding, g.stride, w9c, shift, g.w_out, yd + r * row_out);
      }
    });
  } else {
    for_each_conv_row_cl<scalar_t, T>(x, w9c, shift, g, [&](int64_t r, T* z) {
      scalar_t* out = yd + r * row_out;
      relu6_convert_run(z, row_out, out);
    });
  }
}

// Folded weights and shift for mean / invstd: (C, 9) and (C,) in T.
template <typename T>
std::pair<at::Tensor, at::Tensor> fold(const ChannelParams<T>& p, const at::Tensor& mean, const at::Tensor& invstd,
                                       int64_t channels) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  at::Tensor wf = at::empty({channels, kTaps}, at::TensorOptions().dtype(st));
  at::Tensor shift = at::empty({channels}, at::TensorOptions().dtype(st));
  const T* w = p.w.template const_data_ptr<T>();
  const T *b = p.b.template const_data_ptr<T>(), *bw = p.bn_w.template const_data_ptr<T>(),
          *bb = p.bn_b.template const_data_ptr<T>(), *mu = mean.const_data_ptr<T>(),
          *is = invstd.const_data_ptr<T>();
  T* wfd = wf.mutable_data_ptr<T>();
  T* sd = shift.mutable_data_ptr<T>();
  for (int64_t c = 0; c < channels; ++c) {
    const auto f = dwconv::bn_fold(b[c], bw[c], bb[c], mu[c], is[c]);
    for (int t = 0; t < kTaps; ++t) wfd[c * kTaps + t] = w[c * kTaps + t] * f.scale;
    sd[c] = f.shift;
  }
  return {wf, shift};
}

template <typename T>
ChannelParams<T> channel_params(const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias, int64_t channels) {
  ChannelParams<T> p;
  p.w = widen<T>(weight).reshape({channels, kTaps});
  p.b = bias.has_value() ? widen<T>(*bias)
                         : at::zeros({channels}, weight.options().dtype(c10::CppTypeToScalarType<T>::value));
  p.bn_w = widen<T>(bn_weight);
  p.bn_b = widen<T>(bn_bias);
  return p;
}

// (C, 9) -> (9, C): the channels_last loops read one tap for all channels.
at::Tensor taps_major(const at::Tensor& w) { return w.t().contiguous(); }

Geometry geometry(const at::Tensor& x, const std::array<int64_t, 4>& out, int64_t stride, int64_t padding) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), out[2], out[3], stride, padding};
}

at::Tensor empty_output(const at::Tensor& x, const std::array<int64_t, 4>& out, bool channels_last) {
  return at::empty({out[0], out[1], out[2], out[3]},
                   x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

template <typename scalar_t>
void affine_relu6(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& shift, const Geometry& g,
                  bool channels_last, at::Tensor& y) {
  using T = acc_type_t<scalar_t>;
  if (channels_last) {
    const at::Tensor w9c = taps_major(wf);
    affine_relu6_cl<scalar_t, T>(x, w9c.const_data_ptr<T>(), shift.const_data_ptr<T>(), g, y);
  } else {
    affine_relu6_nchw<scalar_t, T>(x, wf.const_data_ptr<T>(), shift.const_data_ptr<T>(), g, y);
  }
}

// Slots of the backward's per-channel sums: sum ga, sum ga * xhat, sum gz, then the 9 taps
// of grad_weight.
constexpr int kSlots = 3 + kTaps;

// channels_last backward, native (no NCHW copies): one task per image, vectorized along C, so
// the network's 6x6 planes of many channels run as long vector loops. Pass 1 (training only)
// reduces sum(ga) and sum(ga * xhat) from the recomputed conv; pass 2 recomputes it again,
// forms the image's gz (H_out, W_out, C) with its grad_weight / grad_bias sums, then writes
// grad_x row by row as a gather from gz. Per-image sums are double, reduced over the batch in
// a fixed order: the result does not depend on the thread count. sd is (C, kSlots).
template <typename scalar_t, typename T>
void backward_cl(const at::Tensor& x, const at::Tensor& grad_out, const ChannelParams<T>& p, const T* mu,
                 const T* is, const Geometry& g, bool training, double count, at::Tensor& grad_x, double* sd) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t C = g.c, row_in = g.w * C, row_out = g.w_out * C;
  const at::Tensor w9c_t = taps_major(p.w);
  const T* w9c = w9c_t.const_data_ptr<T>();
  const T* b = p.b.template const_data_ptr<T>();
  const T* bw = p.bn_w.template const_data_ptr<T>();
  const T* bb = p.bn_b.template const_data_ptr<T>();
  std::vector<double> part(g.n * kSlots * C);
  auto reduce = [&](int first, int last) {
    for (int s = first; s < last; ++s)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0;
        for (int64_t n = 0; n < g.n; ++n) acc += part[(n * kSlots + s) * C + c];
        sd[c * kSlots + s] = acc;
      }
  };
  // Per-thread rows: x rows widened (when scalar_t is not T), conv row, gradient row widened.
  struct Rows {
    std::vector<T> xbuf, z, gbuf, s0, s1, s2, gw;
    Rows(const Geometry& g, bool widen)
        : xbuf(widen ? 3 * g.w * g.c : 0), z(g.w_out * g.c), gbuf(widen ? g.w_out * g.c : 0), s0(g.c), s1(g.c),
          s2(g.c), gw(kTaps * g.c) {}
  };
  constexpr bool kWiden = !std::is_same_v<scalar_t, T>;
  std::vector<T> k_ga(C, T(0)), k_xhat(C, T(0)), k_one(C, T(0)), zeros(C, T(0));
  if (training) {
    at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
      Rows r(g, kWiden);
      for (int64_t n = begin; n < end; ++n) {
        double* acc = part.data() + n * kSlots * C;
        std::fill(acc, acc + 2 * C, 0.0);
        for (int64_t oy = 0; oy < g.h_out; ++oy) {
          const T* rows[3];
          rows_under(xd + n * g.h * row_in, g, oy, r.xbuf, rows);
          conv_row_cl_fused<T, false>(rows, g.w, C, g.padding, g.stride, w9c, b, g.w_out, r.z.data());
          const T* gr = load_as(gd + (n * g.h_out + oy) * row_out, row_out, r.gbuf.data());
          bn_relu6_grad_row_cl<T, false>(r.z.data(), gr, g.w_out, C, mu, is, bw, bb, nullptr, nullptr, nullptr,
                                         nullptr, r.s0.data(), r.s1.data(), nullptr);
          for (int64_t c = 0; c < C; ++c) {
            acc[c] += r.s0[c];
            acc[C + c] += r.s1[c];
          }
        }
      }
    });
    reduce(0, 2);
  }
  for (int64_t c = 0; c < C; ++c) {
    const auto k = dwconv::bn_backward_coeffs<T>(bw[c], is[c], training ? sd[c * kSlots] : 0.0,
                                                 training ? sd[c * kSlots + 1] : 0.0, count, training);
    k_ga[c] = k.k_ga;
    k_xhat[c] = k.k_xhat;
    k_one[c] = k.k_one;
  }
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    Rows r(g, kWiden);
    std::vector<T> gz(g.h_out * row_out), gx_row(kWiden ? row_in : 0);
    for (int64_t n = begin; n < end; ++n) {
      double* acc = part.data() + n * kSlots * C;
      std::fill(acc + (training ? 2 : 0) * C, acc + kSlots * C, 0.0);
      const scalar_t* img = xd + n * g.h * row_in;
      for (int64_t oy = 0; oy < g.h_out; ++oy) {
        const T* rows[3];
        rows_under(img, g, oy, r.xbuf, rows);
        conv_row_cl_fused<T, false>(rows, g.w, C, g.padding, g.stride, w9c, b, g.w_out, r.z.data());
        const T* gr = load_as(gd + (n * g.h_out + oy) * row_out, row_out, r.gbuf.data());
        T* gzr = gz.data() + oy * row_out;
        bn_relu6_grad_row_cl<T, true>(r.z.data(), gr, g.w_out, C, mu, is, bw, bb, k_ga.data(), k_xhat.data(),
                                      k_one.data(), gzr, r.s0.data(), r.s1.data(), r.s2.data());
        grad_weight_row_cl(rows, g.w, C, g.padding, g.stride, gzr, g.w_out, r.gw.data());
        for (int64_t c = 0; c < C; ++c) {
          if (!training) {
            acc[c] += r.s0[c];
            acc[C + c] += r.s1[c];
          }
          acc[2 * C + c] += r.s2[c];
        }
        for (int64_t i = 0; i < kTaps * C; ++i) acc[3 * C + i] += r.gw[i];
      }
      for (int64_t iy = 0; iy < g.h; ++iy) {
        scalar_t* dst = gxd + (n * g.h + iy) * row_in;
        if constexpr (kWiden) {
          grad_input_row_cl(gz.data(), g.h_out, g.w_out, iy, g.w, C, g.padding, g.stride, w9c, zeros.data(),
                            gx_row.data());
          convert_run(gx_row.data(), row_in, dst);
        } else {
          grad_input_row_cl(gz.data(), g.h_out, g.w_out, iy, g.w, C, g.padding, g.stride, w9c, zeros.data(), dst);
        }
      }
    }
  });
  reduce(training ? 2 : 0, kSlots);
}

#define FERCUDA_DISPATCH_DWCONV(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// ---- Ops -----------------------------------------------------------------------------

at::Tensor dwconv_bn_relu6_cpu(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
                               const at::Tensor& running_var, int64_t stride, int64_t padding, double eps) {
  const char* op = "dwconv_bn_relu6";
  const auto out = check_dwconv_args(op, x_in, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride,
                                     padding, "running_mean", "running_var", /*allow_double=*/true);
  check_dwconv_eps(op, eps);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  at::Tensor y = empty_output(x, out, cl);
  if (y.numel() == 0) return y;
  const Geometry g = geometry(x, out, stride, padding);
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6", [&] {
    using T = acc_type_t<scalar_t>;
    const auto p = channel_params<T>(weight, bias, bn_weight, bn_bias, g.c);
    const at::Tensor mean = widen<T>(running_mean);
    const at::Tensor invstd = at::rsqrt(widen<T>(running_var) + eps);
    auto [wf, shift] = fold(p, mean, invstd, g.c);
    affine_relu6<scalar_t>(x, wf, shift, g, cl, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var,
    int64_t stride, int64_t padding, double eps, double momentum) {
  const char* op = "dwconv_bn_relu6_train";
  const auto out = check_dwconv_args(op, x_in, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride,
                                     padding, "running_mean", "running_var", /*allow_double=*/true);
  check_dwconv_eps(op, eps);
  check_dwconv_momentum(op, momentum);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  at::Tensor y = empty_output(x, out, cl);
  const int64_t channels = out[1];
  // float32 statistics, or float64 for float64 x (as native batch_norm saves them).
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stats_opts = x.options().dtype(stats_dtype);
  if (y.numel() == 0) {
    // nn.BatchNorm2d leaves the running statistics alone on an empty batch.
    return {y, at::zeros({channels}, stats_opts), at::ones({channels}, stats_opts), running_mean.clone(),
            running_var.clone()};
  }
  check_dwconv_batch_stats(op, out[0], out[1], out[2], out[3]);
  const Geometry g = geometry(x, out, stride, padding);
  const int64_t count = g.n * g.h_out * g.w_out;
  at::Tensor batch_mean = at::empty({channels}, x.options().dtype(at::kDouble));
  at::Tensor batch_var = at::empty({channels}, x.options().dtype(at::kDouble));  // biased
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_train", [&] {
    using T = acc_type_t<scalar_t>;
    const auto p = channel_params<T>(weight, bias, bn_weight, bn_bias, g.c);
    const T* w = p.w.template const_data_ptr<T>();
    const T* b = p.b.template const_data_ptr<T>();
    double* mean_d = batch_mean.mutable_data_ptr<double>();
    double* var_d = batch_var.mutable_data_ptr<double>();
    // Pass 1: conv -> per-part mean / M2 (parts of equal size), then Chan's combination.
    if (cl) {
      at::Tensor part_mean = at::empty({g.n * g.h_out, g.c}, p.w.options());
      at::Tensor part_m2 = at::empty({g.n * g.h_out, g.c}, p.w.options());
      T* pm = part_mean.mutable_data_ptr<T>();
      T* pq = part_m2.mutable_data_ptr<T>();
      const at::Tensor w9c = taps_major(p.w);
      for_each_conv_row_cl<scalar_t, T>(x, w9c.const_data_ptr<T>(), b, g, [&](int64_t r, T* z) {
        row_mean_m2_cl(z, g.w_out, g.c, pm + r * g.c, pq + r * g.c);
      });
      const int64_t parts = g.n * g.h_out;
      at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          double s = 0;
          for (int64_t r = 0; r < parts; ++r) s += pm[r * g.c + c];
          const double mu = s / parts;
          double m2 = 0;
          for (int64_t r = 0; r < parts; ++r) {
            const double d = pm[r * g.c + c] - mu;
            m2 += pq[r * g.c + c] + d * d * g.w_out;
          }
          mean_d[c] = mu;
          var_d[c] = m2 / count;
        }
      });
    } else {
      std::vector<double> pm(g.n * g.c), pq(g.n * g.c);
      const scalar_t* xd = x.const_data_ptr<scalar_t>();
      const int64_t plane_out = g.h_out * g.w_out;
      const int64_t len = wide_len(g);
      at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> xp = padded_buffer<T>(g), z(len), valid(len, T(0));
        for (int64_t oy = 0; oy < g.h_out; ++oy)
          std::fill(valid.begin() + oy * g.wp(), valid.begin() + oy * g.wp() + g.w_out, T(1));
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c = q % g.c;
          load_padded_plane(xd + q * g.h * g.w, g, xp.data());
          conv_wide(xp.data(), g.wp(), w + c * kTaps, b[c], g.stride, len, z.data());
          mean_m2_wide(z.data(), valid.data(), len, plane_out, pm[q], pq[q]);
        }
      });
      for (int64_t c = 0; c < g.c; ++c) {
        double s = 0;
        for (int64_t n = 0; n < g.n; ++n) s += pm[n * g.c + c];
        const double mu = s / g.n;
        double m2 = 0;
        for (int64_t n = 0; n < g.n; ++n) {
          const double d = pm[n * g.c + c] - mu;
          m2 += pq[n * g.c + c] + d * d * plane_out;
        }
        mean_d[c] = mu;
        var_d[c] = m2 / count;
      }
    }
    // Pass 2: recompute the conv, normalize with the batch statistics, ReLU6, write y.
    const at::Tensor mean_t = batch_mean.to(c10::CppTypeToScalarType<T>::value);
    const at::Tensor invstd_t = at::rsqrt(batch_var + eps).to(c10::CppTypeToScalarType<T>::value);
    auto [wf, shift] = fold(p, mean_t, invstd_t, g.c);
    affine_relu6<scalar_t>(x, wf, shift, g, cl, y);
  });
  // nn.BatchNorm2d: the running variance takes the unbiased estimate.
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  at::Tensor new_mean = (running_mean.to(at::kDouble) * (1.0 - momentum) + batch_mean * momentum)
                            .to(running_mean.scalar_type());
  at::Tensor new_var = (running_var.to(at::kDouble) * (1.0 - momentum) + batch_var * (unbias * momentum))
                           .to(running_var.scalar_type());
  return {y, batch_mean.to(stats_dtype), at::rsqrt(batch_var + eps).to(stats_dtype), new_mean, new_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& invstd, int64_t stride, int64_t padding, bool training) {
  const char* op = "dwconv_bn_relu6_backward";
  const auto out = check_dwconv_args(op, x_in, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                     "mean", "invstd", /*allow_double=*/true);
  check_dwconv_grad_out(op, grad_out_in, x_in, out);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  const at::Tensor grad_out = as_layout(grad_out_in, cl);
  const int64_t channels = out[1];
  at::Tensor grad_x = at::empty_like(x);  // x's layout
  at::Tensor grad_w = at::empty({channels, 1, 3, 3}, weight.options());
  at::Tensor grad_b = at::empty({channels}, weight.options());
  at::Tensor grad_bn_w = at::empty({channels}, bn_weight.options());
  at::Tensor grad_bn_b = at::empty({channels}, bn_bias.options());
  if (x.numel() == 0 || grad_out.numel() == 0) {
    grad_x.zero_();
    grad_w.zero_();
    grad_b.zero_();
    grad_bn_w.zero_();
    grad_bn_b.zero_();
    return {grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b};
  }
  const Geometry g = geometry(x, out, stride, padding);
  const double count = static_cast<double>(g.n * g.h_out * g.w_out);
  const int64_t planes = g.n * g.c;
  const int64_t plane_in = g.h * g.w, plane_out = g.h_out * g.w_out;
  // NCHW: per-plane partials in the kSlots order.
  std::vector<double> part(cl ? 0 : planes * kSlots);
  at::Tensor sums = at::empty({channels, kSlots}, x.options().dtype(at::kDouble));
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_backward", [&] {
    using T = acc_type_t<scalar_t>;
    const auto p = channel_params<T>(weight, bias, bn_weight, bn_bias, g.c);
    const T* w = p.w.template const_data_ptr<T>();
    const T* b = p.b.template const_data_ptr<T>();
    const T* bw = p.bn_w.template const_data_ptr<T>();
    const T* bb = p.bn_b.template const_data_ptr<T>();
    const at::Tensor mean_t = widen<T>(mean), invstd_t = widen<T>(invstd);
    const T* mu = mean_t.const_data_ptr<T>();
    const T* is = invstd_t.const_data_ptr<T>();
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
    double* sd = sums.mutable_data_ptr<double>();
    if (cl) {
      backward_cl<scalar_t, T>(x, grad_out, p, mu, is, g, training, count, grad_x, sd);
      return;
    }
    auto reduce_planes = [&](int first_slot, int slots) {
      for (int64_t c = 0; c < g.c; ++c)
        for (int s = first_slot; s < first_slot + slots; ++s) {
          double acc = 0;
          for (int64_t n = 0; n < g.n; ++n) acc += part[(n * g.c + c) * kSlots + s];
          sd[c * kSlots + s] = acc;
        }
    };
    // Pass 1 (training only): sum(ga) and sum(ga * xhat) over the batch.
    const int64_t len = wide_len(g);
    std::vector<dwconv::BNBackward<T>> coeffs(g.c);
    if (training) {
      at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> xp = padded_buffer<T>(g), gwide = padded_buffer<T>(g), z(len);
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c = q % g.c;
          load_padded_plane(xd + q * plane_in, g, xp.data());
          conv_wide(xp.data(), g.wp(), w + c * kTaps, b[c], g.stride, len, z.data());
          load_wide_plane(gd + q * plane_out, g, gwide.data());
          T s_ga, s_gx;
          bn_relu6_grad_wide<T>(z.data(), gwide.data(), len, mu[c], is[c], bw[c], bb[c], {}, nullptr, s_ga, s_gx);
          part[q * kSlots + 0] = s_ga;
          part[q * kSlots + 1] = s_gx;
        }
      });
      reduce_planes(0, 2);
    }
    for (int64_t c = 0; c < g.c; ++c) {
      coeffs[c] = dwconv::bn_backward_coeffs<T>(bw[c], is[c], training ? sd[c * kSlots] : 0.0,
                                                training ? sd[c * kSlots + 1] : 0.0, count, training);
    }
    // Pass 2: gz, then grad_x (transposed conv) and the grad_weight / grad_bias partials.
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      // gz sits behind a zero margin of two padded rows + 2 and before zeros up to the padded
      // plane's size, for the stride-1 gather (entries past len are never written).
      const int64_t gz_front = 2 * g.wp() + 2;
      const int64_t padded_len = (g.hp() * g.wp() + kVecLen<T> - 1) / kVecLen<T> * kVecLen<T>;
      std::vector<T> xp = padded_buffer<T>(g), gxp(std::max<int64_t>(padded_len, g.hp() * g.wp() + 2 * kLanes)),
                     gwide = padded_buffer<T>(g), z(len),
                     gz_buf(gz_front + std::max(len, padded_len) + 2 * kLanes, T(0));
      T* const gz = gz_buf.data() + gz_front;
      const std::vector<int32_t> interior = plane_index(g.h, g.w, g.wp(), g.padding);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t c = q % g.c;
        load_padded_plane(xd + q * plane_in, g, xp.data());
        conv_wide(xp.data(), g.wp(), w + c * kTaps, b[c], g.stride, len, z.data());
        load_wide_plane(gd + q * plane_out, g, gwide.data());
        T s_ga, s_gx;
        bn_relu6_grad_wide<T>(z.data(), gwide.data(), len, mu[c], is[c], bw[c], bb[c], coeffs[c], gz, s_ga,
                              s_gx);
        // Scratch entries: no gradient (training's gz has a constant term there).
        for (int64_t oy = 0; oy + 1 < g.h_out; ++oy)
          std::fill(gz + oy * g.wp() + g.w_out, gz + (oy + 1) * g.wp(), T(0));
        std::fill(gz + wide_outputs_end(g), gz + len, T(0));
        double* slot = part.data() + q * kSlots;
        if (!training) {
          slot[0] = s_ga;
          slot[1] = s_gx;
        }
        slot[2] = sum_of(gz, len);
        T gw[kTaps];
        grad_weight_wide(xp.data(), g.wp(), gz, g.stride, len, gw);
        for (int t = 0; t < kTaps; ++t) slot[3 + t] = gw[t];
        if (g.stride == 1) {
          grad_input_gather_wide(gz, w + c * kTaps, g.wp(), padded_len, gxp.data());
        } else {
          std::fill(gxp.begin(), gxp.end(), T(0));
          grad_input_wide(gz, w + c * kTaps, g.stride, len, g.wp(), gxp.data());
        }
        gather_plane(gxp.data(), interior.data(), plane_in, gxd + q * plane_in);
      }
    });
    reduce_planes(training ? 2 : 0, training ? kSlots - 2 : kSlots);
  });
  grad_bn_b.copy_(sums.select(1, 0));
  grad_bn_w.copy_(sums.select(1, 1));
  grad_b.copy_(sums.select(1, 2));
  grad_w.view({channels, kTaps}).copy_(sums.narrow(1, 3, kTaps));
  return {grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b};
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CPU, m) {
  m.impl("dwconv_bn_relu6", &fercuda::dwconv_bn_relu6_cpu);
  m.impl("dwconv_bn_relu6_train", &fercuda::dwconv_bn_relu6_train_cpu);
  m.impl("dwconv_bn_relu6_backward", &fercuda::dwconv_bn_relu6_backward_cpu);
}

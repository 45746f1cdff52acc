// Kernels of the fused depthwise 3x3 conv + BatchNorm + ReLU6 on the CPU: the hot loops of
// both layouts, the per-plane / per-row helpers around them, and the deterministic merges of
// per-task partial results, written once in portable vector code; each instruction-set path
// compiles them for its own target (dwconv_cpu_compute.h, dwconv_cpu_path_*.cpp).
// dwconv_cpu_compute.h runs them over tasks; plain C++ on pointers (no ATen).
//
// T is the accumulation type (float, or double for float64 tensors); scalar_t the tensor's
// dtype, met only when a plane or row is loaded or stored.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dwconv_cpu_paths.h"
#include "dwconv_cpu_vec.h"
#include "fercuda/dwconv_math.h"
#include "fercuda/hd.h"

namespace fercuda {
namespace dwconv_cpu {
// Internal linkage, like the op glue: private to dwconv_cpu.cpp, the file that includes it
// (fercuda._C exports none of these symbols).
namespace {

using dwconv::kTaps;

// ---- Shared by both layouts ----------------------------------------------------------------

// Chan's combination of equal-sized parts (per task: an (n, c) plane, an (n, oy) row or an
// image) into the batch mean and biased variance of channels [c_begin, c_end). Part r of
// channel c holds part_count values, with mean part_mean[r * stride + c] and sum of squared
// deviations part_m2[r * stride + c]; count is a channel's total (parts * part_count). Each
// channel's sums run in part order, in double precision; the parts are the outer loop so the
// reads run along memory.
template <typename P>
void chan_merge(const P* part_mean, const P* part_m2, int64_t parts, int64_t stride, int64_t part_count,
                int64_t count, int64_t c_begin, int64_t c_end, double* mean, double* var) {
  for (int64_t c = c_begin; c < c_end; ++c) mean[c] = 0;
  for (int64_t r = 0; r < parts; ++r)
    for (int64_t c = c_begin; c < c_end; ++c) mean[c] += part_mean[r * stride + c];
  for (int64_t c = c_begin; c < c_end; ++c) {
    mean[c] /= parts;
    var[c] = 0;
  }
  for (int64_t r = 0; r < parts; ++r)
    for (int64_t c = c_begin; c < c_end; ++c) {
      const double d = part_mean[r * stride + c] - mean[c];
      var[c] += part_m2[r * stride + c] + d * d * part_count;
    }
  for (int64_t c = c_begin; c < c_end; ++c) var[c] /= count;
}

static_assert(kSlots == 3 + kTaps);

// Where a backward task's partial sums lie: slot s of channel c of image n at
// n * n_stride + c * c_stride + s * s_stride.
struct SlotLayout {
  int64_t n_stride, c_stride, s_stride;
};

// sums[c * kSlots + s] = the partials of slots [first, last) added over the n images in order,
// for channels [c_begin, c_end): the result does not depend on how the tasks were spread over
// threads. The images are the outer loop so the reads run along memory; the running sums are
// kept slot-major in a local buffer (contiguous along the channels, so the adds vectorize and
// no add waits on the store of the one before) and written to sums at the end. P: float or
// double partials (a float widens exactly).
template <typename P>
void sum_over_batch(const P* part, const SlotLayout& l, int64_t n, int64_t c_begin, int64_t c_end, int first,
                    int last, double* sums) {
  const int64_t cn = c_end - c_begin;
  std::vector<double> acc((last - first) * cn, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int s = first; s < last; ++s) {
      const P* src = part + i * l.n_stride + s * l.s_stride + c_begin * l.c_stride;
      double* dst = acc.data() + (s - first) * cn;
      if (l.c_stride == 1) {
        for (int64_t c = 0; c < cn; ++c) dst[c] += src[c];
      } else {
        for (int64_t c = 0; c < cn; ++c) dst[c] += src[c * l.c_stride];
      }
    }
  for (int64_t c = 0; c < cn; ++c)
    for (int s = first; s < last; ++s) sums[(c_begin + c) * kSlots + s] = acc[(s - first) * cn + c];
}

// The per-channel coefficients of gz (dwconv::BNBackward); training reads sum ga and
// sum ga * xhat from sums (C, kSlots).
template <typename T>
std::vector<dwconv::BNBackward<T>> backward_coeffs(const T* bn_w, const T* invstd, const double* sums, double count,
                                                   bool training, int64_t channels) {
  std::vector<dwconv::BNBackward<T>> k(channels);
  for (int64_t c = 0; c < channels; ++c)
    k[c] = dwconv::bn_backward_coeffs<T>(bn_w[c], invstd[c], training ? sums[c * kSlots] : 0.0,
                                         training ? sums[c * kSlots + 1] : 0.0, count, training);
  return k;
}

// Vectors cross no call boundary here (see load_vec).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// ---- NCHW: one task per (n, c) plane, in the wide layout -----------------------------------
//
// NCHW planes are processed in a "wide" layout: output (oy, ox) lives at k = oy * wp + ox,
// wp being the padded plane's row length, so a tap (ky, kx) reads the padded plane at
// k * stride + ky * wp + kx for every output and each loop runs over the whole plane at
// once: long vector loops even for the network's 6x6 planes. Entries with ox >= w_out are
// scratch (the last row has none); the backward gives them a zero gradient.
template <typename T>
void conv_wide(const T* __restrict xp, int64_t wp, const T* __restrict w, T shift, int64_t stride,
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
void store_relu6_wide(const T* __restrict z, int64_t wp, int64_t h_out, int64_t w_out,
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
void gather_plane(const T* __restrict src, const int32_t* __restrict index, int64_t n,
                               scalar_t* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[index[i]]);
}

// Mean and sum of squared deviations of one wide plane's outputs, valid[k] being 1 for
// outputs and 0 for scratch entries (two passes over L1-resident data: no cancellation,
// unlike sum and sum of squares).
template <typename T>
void mean_m2_wide(const T* __restrict z, const T* __restrict valid, int64_t len, int64_t count,
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

// Backward, elementwise on one wide plane: from z and g (zero in the scratch entries), the
// ReLU6 mask and xhat; the sums of ga and ga * xhat; gz where wanted.
template <typename T>
void bn_relu6_grad_wide(const T* __restrict z, const T* __restrict g, int64_t len, T mean, T invstd,
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

// grad_w[tap] = sum over the wide plane of gz * the input under that tap.
template <typename T>
void grad_weight_wide(const T* __restrict xp, int64_t wp, const T* __restrict gz, int64_t stride,
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
  // Stride 2: one strided sweep per tap.
  for (int t = 0; t < kTaps; ++t) {
    const T* r = xp + (t / 3) * wp + (t % 3);
    T acc[kLanes] = {};
    T tail = 0;
    int64_t k = 0;
    for (; k + kLanes <= len; k += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += gz[k + j] * r[2 * (k + j)];
    for (; k < len; ++k) tail += gz[k] * r[2 * k];
    gw[t] = combine_lanes(acc, tail);
  }
}

// Transposed depthwise conv: scatter gz * w into the padded plane gxp (zeroed by the caller).
template <typename T>
void grad_input_wide(const T* __restrict gz, const T* __restrict w, int64_t stride, int64_t len,
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
void grad_input_gather_wide(const T* __restrict gz, const T* __restrict w, int64_t wp,
                                         int64_t len_padded, T* __restrict gxp) {
  constexpr int64_t kV = kVecLen<T>;
  for (int64_t p = 0; p < len_padded; p += kV) {
    Vec<T> acc = {};
    for (int t = 0; t < kTaps; ++t) acc += load_vec(gz + p - (t / 3) * wp - (t % 3)) * w[t];
    store_vec(gxp + p, acc);
  }
}

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

// Widens one (H_out, W_out) plane into the wide buffer (scratch entries stay zero).
template <typename scalar_t, typename T>
void load_wide_plane(const scalar_t* src, const Geometry& g, T* wide) {
  for (int64_t oy = 0; oy < g.h_out; ++oy)
    for (int64_t ox = 0; ox < g.w_out; ++ox) wide[oy * g.wp() + ox] = static_cast<T>(src[oy * g.w_out + ox]);
}

// z = the wide plane of conv(x_plane) + shift, x_plane widened into the padded buffer xp first.
template <typename scalar_t, typename T>
void conv_plane(const scalar_t* x_plane, const Geometry& g, const T* w, T shift, int64_t len, T* xp, T* z) {
  load_padded_plane(x_plane, g, xp);
  conv_wide(xp, g.wp(), w, shift, g.stride, len, z);
}

// ---- channels_last: one task per (n, output row) or per image, loops along C ---------------
//
// Rows are (W, C) arrays of the accumulation type; in conv_row_cl_fused, three input rows
// (a null row is zero padding) give one output row (shift[c] + 3x3 window, then ReLU6 when
// kRelu6) written straight to out[ox][c], the taps summed in order (ky, then kx).
//
// The row loops read a row one vector of channels at a time, pixel after pixel, C values
// apart: a stride the hardware prefetcher follows poorly, so a row read straight from a tensor
// would be fetched from memory a cache line per pixel on demand. The kernels that read rows in
// place take the row the next call will read (next, may be null) and prefetch an equal share
// of it in each channel block, so it is in cache when its turn comes.

// Prefetches share `block` of the `blocks` equal shares of the n values at next.
template <typename T>
__attribute__((always_inline)) inline void prefetch_share(const T* next, int64_t n, int64_t block, int64_t blocks) {
  if (next == nullptr) return;
  const char* begin = reinterpret_cast<const char*>(next + n * block / blocks);
  const char* end = reinterpret_cast<const char*>(next + n * (block + 1) / blocks);
  for (const char* p = begin; p < end; p += 64) __builtin_prefetch(p);
}

// Calls tap(t, p) for the taps (ky, kx) of a 3x3 window with rows[ky] present and kx in
// [kx_lo, kx_hi), in the order (ky, then kx): t = ky * 3 + kx, p = rows[ky] + offset +
// kx * col_step. The column ranges of a row's borders ([0, 3), [1, 3), [0, 2)) get constant
// bounds, so the taps unroll with constant indices and the caller's nine weights or sums stay
// in registers (instead of a loop that tests every tap); other ranges loop.
template <typename T, typename Tap>
__attribute__((always_inline)) inline void for_window_taps(const T* const rows[3], int64_t offset, int64_t col_step,
                                                           int64_t kx_lo, int64_t kx_hi, Tap tap) {
  auto run = [&](auto lo, auto hi) __attribute__((always_inline)) {
    for (int ky = 0; ky < 3; ++ky) {
      if (rows[ky] == nullptr) continue;
      const T* p = rows[ky] + offset;
      for (int kx = lo; kx < hi; ++kx) tap(ky * 3 + kx, p + kx * col_step);
    }
  };
  using Lo0 = std::integral_constant<int, 0>;
  using Lo1 = std::integral_constant<int, 1>;
  using Hi2 = std::integral_constant<int, 2>;
  using Hi3 = std::integral_constant<int, 3>;
  if (kx_lo == 0 && kx_hi == 3) {
    run(Lo0{}, Hi3{});
  } else if (kx_lo == 1 && kx_hi == 3) {
    run(Lo1{}, Hi3{});
  } else if (kx_lo == 0 && kx_hi == 2) {
    run(Lo0{}, Hi2{});
  } else {
    run(static_cast<int>(kx_lo), static_cast<int>(kx_hi));
  }
}

// One vector of channels at a time: its nine tap weights and shift stay in registers while
// the loop runs along the row, so each tap costs one load and one multiply-add (the weights
// are not re-read per pixel). Taps are summed in the order (ky, then kx), after the shift.
// next: the input row the next output row adds (width * channels values), prefetched.
template <typename T, bool kRelu6>
void conv_row_cl_fused(const T* const rows[3], int64_t width, int64_t channels, int64_t padding,
                                    int64_t stride, const T* __restrict w9c, const T* __restrict shift, int64_t w_out,
                                    T* __restrict out, const T* next = nullptr) {
  constexpr int64_t kV = kVecLen<T>;
  const T* const r0 = rows[0];
  const T* const r1 = rows[1];
  const T* const r2 = rows[2];
  // Output columns whose three input columns all lie inside the row.
  const int64_t ox_lo = std::min<int64_t>(w_out, (padding + stride - 1) / stride);
  const int64_t ox_hi = std::max<int64_t>(ox_lo, std::min<int64_t>(w_out, (width - 3 + padding) / stride + 1));
  const Vec<T> zero = Vec<T>{}, six = zero + T(6);
  int64_t c0 = 0;
  for (; c0 + kV <= channels; c0 += kV) {
    Vec<T> wv[kTaps];
    for (int t = 0; t < kTaps; ++t) wv[t] = load_vec(w9c + t * channels + c0);
    const Vec<T> sh = load_vec(shift + c0);
    prefetch_share(next, width * channels, c0 / kV, channels / kV);
    auto finish = [&](int64_t ox, Vec<T> a) {
      if constexpr (kRelu6) a = a < zero ? zero : (a > six ? six : a);  // as dwconv::relu6 (NaN propagates)
      store_vec(out + ox * channels + c0, a);
    };
    auto edge = [&](int64_t ox) {
      // The tap columns inside the row: [kx_lo, kx_hi).
      const int64_t ix0 = ox * stride - padding;
      const int64_t kx_lo = std::max<int64_t>(0, -ix0), kx_hi = std::min<int64_t>(3, width - ix0);
      const int64_t offset = ix0 * channels + c0;
      Vec<T> a = sh;
      for_window_taps(rows, offset, channels, kx_lo, kx_hi, [&](int t, const T* p) { a += load_vec(p) * wv[t]; });
      finish(ox, a);
    };
    for (int64_t ox = 0; ox < ox_lo; ++ox) edge(ox);
    if (r0 != nullptr && r1 != nullptr && r2 != nullptr) {
      for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
        const int64_t o = (ox * stride - padding) * channels + c0;
        Vec<T> a = sh;
        a += load_vec(r0 + o) * wv[0];
        a += load_vec(r0 + o + channels) * wv[1];
        a += load_vec(r0 + o + 2 * channels) * wv[2];
        a += load_vec(r1 + o) * wv[3];
        a += load_vec(r1 + o + channels) * wv[4];
        a += load_vec(r1 + o + 2 * channels) * wv[5];
        a += load_vec(r2 + o) * wv[6];
        a += load_vec(r2 + o + channels) * wv[7];
        a += load_vec(r2 + o + 2 * channels) * wv[8];
        finish(ox, a);
      }
    } else {
      for (int64_t ox = ox_lo; ox < ox_hi; ++ox) edge(ox);
    }
    for (int64_t ox = ox_hi; ox < w_out; ++ox) edge(ox);
  }
  for (; c0 < channels; ++c0) {
    for (int64_t ox = 0; ox < w_out; ++ox) {
      T a = shift[c0];
      const int64_t ix0 = ox * stride - padding;
      for (int ky = 0; ky < 3; ++ky) {
        if (rows[ky] == nullptr) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ix = ix0 + kx;
          if (ix >= 0 && ix < width) a += rows[ky][ix * channels + c0] * w9c[(ky * 3 + kx) * channels + c0];
        }
      }
      out[ox * channels + c0] = kRelu6 ? dwconv::relu6(a) : a;
    }
  }
}

// channels_last backward, one input row iy of grad_x: the transposed conv written as a gather,
// gx[ix][c] = sum over the taps (ky, kx) that put input (iy, ix) under an output (oy, ox) of
// gz[oy][ox][c] * w[ky][kx][c], the taps in order (ky, then kx); gz is the image's
// (H_out, W_out, C) gradient. As in conv_row_cl_fused, one vector of channels at a time with
// its nine weights in registers along the row.
template <typename T>
void grad_input_row_cl(const T* __restrict gz, int64_t h_out, int64_t w_out, int64_t iy, int64_t width,
                                    int64_t channels, int64_t padding, int64_t stride, const T* __restrict w9c,
                                    T* __restrict out) {
  // stride is 1 or 2: shifts and masks, not divisions, in the per-pixel loops.
  const int64_t shift = stride == 2 ? 1 : 0, odd = stride - 1;
  const T* grow[3];  // the gz row that tap row ky reaches from iy, or null
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t ny = iy + padding - ky;
    grow[ky] = (ny < 0 || (ny & odd) != 0 || (ny >> shift) >= h_out) ? nullptr : gz + (ny >> shift) * w_out * channels;
  }
  // Stride 1: the input columns that all three tap columns map to an output column.
  const int64_t ix_lo = stride == 1 ? std::clamp<int64_t>(2 - padding, 0, width) : width;
  const int64_t ix_hi = stride == 1 ? std::max(ix_lo, std::min(width, w_out - padding)) : width;
  const bool full = grow[0] != nullptr && grow[1] != nullptr && grow[2] != nullptr;
  constexpr int64_t kV = kVecLen<T>;
  int64_t c0 = 0;
  for (; c0 + kV <= channels; c0 += kV) {
    Vec<T> wv[kTaps];
    for (int t = 0; t < kTaps; ++t) wv[t] = load_vec(w9c + t * channels + c0);
    auto edge = [&](int64_t ix) {
      Vec<T> a = Vec<T>{};
      if (stride == 1) {
        // Tap column kx reads output column ix + padding - kx: inside the row for kx in
        // [kx_lo, kx_hi): a window with a negative column step.
        const int64_t kx_lo = std::max<int64_t>(0, ix + padding - w_out + 1);
        const int64_t kx_hi = std::min<int64_t>(3, ix + padding + 1);
        const int64_t offset = (ix + padding) * channels + c0;
        for_window_taps(grow, offset, -channels, kx_lo, kx_hi, [&](int t, const T* p) { a += load_vec(p) * wv[t]; });
        store_vec(out + ix * channels + c0, a);
        return;
      }
      for (int ky = 0; ky < 3; ++ky) {
        if (grow[ky] == nullptr) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t nx = ix + padding - kx;
          if (nx < 0 || (nx & odd) != 0 || (nx >> shift) >= w_out) continue;
          a += load_vec(grow[ky] + (nx >> shift) * channels + c0) * wv[ky * 3 + kx];
        }
      }
      store_vec(out + ix * channels + c0, a);
    };
    for (int64_t ix = 0; ix < ix_lo; ++ix) edge(ix);
    if (full) {
      const T* const g0 = grow[0];
      const T* const g1 = grow[1];
      const T* const g2 = grow[2];
      for (int64_t ix = ix_lo; ix < ix_hi; ++ix) {
        const int64_t o = (ix + padding - 2) * channels + c0;  // tap column kx reads o + (2 - kx) * C
        Vec<T> a = Vec<T>{};
        a += load_vec(g0 + o + 2 * channels) * wv[0];
        a += load_vec(g0 + o + channels) * wv[1];
        a += load_vec(g0 + o) * wv[2];
        a += load_vec(g1 + o + 2 * channels) * wv[3];
        a += load_vec(g1 + o + channels) * wv[4];
        a += load_vec(g1 + o) * wv[5];
        a += load_vec(g2 + o + 2 * channels) * wv[6];
        a += load_vec(g2 + o + channels) * wv[7];
        a += load_vec(g2 + o) * wv[8];
        store_vec(out + ix * channels + c0, a);
      }
    } else {
      for (int64_t ix = ix_lo; ix < ix_hi; ++ix) edge(ix);
    }
    for (int64_t ix = ix_hi; ix < width; ++ix) edge(ix);
  }
  for (; c0 < channels; ++c0) {
    for (int64_t ix = 0; ix < width; ++ix) {
      T a = 0;
      for (int ky = 0; ky < 3; ++ky) {
        if (grow[ky] == nullptr) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t nx = ix + padding - kx;
          if (nx < 0 || (nx & odd) != 0 || (nx >> shift) >= w_out) continue;
          a += grow[ky][(nx >> shift) * channels + c0] * w9c[(ky * 3 + kx) * channels + c0];
        }
      }
      out[ix * channels + c0] = a;
    }
  }
}

// channels_last backward, one output row: from the conv row z[ox][c] and the gradient row
// g[ox][c], per channel the ReLU6 mask, xhat, the row's sums of ga and ga * xhat and, when
// kGz, gz[ox][c] and its row sum; the sums are added to sum_ga, sum_gx, sum_gz. k holds the
// (C,) vectors k_ga, k_xhat, k_one of dwconv::BNBackward. next_g: the gradient row of the next
// call (w_out * channels values), prefetched.
template <typename T, bool kGz>
void bn_relu6_grad_row_cl(const T* __restrict z, const T* __restrict g, int64_t w_out, int64_t channels,
                                       const T* __restrict mu, const T* __restrict is, const T* __restrict bw,
                                       const T* __restrict bb, const T* __restrict k_ga, const T* __restrict k_xhat,
                                       const T* __restrict k_one, T* __restrict gz, T* __restrict sum_ga,
                                       T* __restrict sum_gx, T* __restrict sum_gz, const T* next_g = nullptr) {
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
    prefetch_share(next_g, w_out * channels, c0 / kV, channels / kV);
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
    store_vec(sum_ga + c0, load_vec(sum_ga + c0) + s_ga);
    store_vec(sum_gx + c0, load_vec(sum_gx + c0) + s_gx);
    if constexpr (kGz) store_vec(sum_gz + c0, load_vec(sum_gz + c0) + s_gz);
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
    sum_ga[c0] += s_ga;
    sum_gx[c0] += s_gx;
    if constexpr (kGz) sum_gz[c0] += s_gz;
  }
}

// channels_last backward, one output row: gw[tap][c] += sum over the row of gz[ox][c] times
// the input under that tap (rows as in conv_row_cl_fused). Channels go one vector at a time,
// its nine tap sums held in registers across the whole row.
template <typename T>
void grad_weight_row_cl(const T* const rows[3], int64_t width, int64_t channels, int64_t padding,
                                     int64_t stride, const T* __restrict gz, int64_t w_out, T* __restrict gw) {
  constexpr int64_t kV = kVecLen<T>;
  int64_t c0 = 0;
  for (; c0 + kV <= channels; c0 += kV) {
    Vec<T> acc[kTaps];
    for (int t = 0; t < kTaps; ++t) acc[t] = load_vec(gw + t * channels + c0);
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const Vec<T> gv = load_vec(gz + ox * channels + c0);
      const int64_t ix0 = ox * stride - padding;
      const int64_t kx_lo = std::max<int64_t>(0, -ix0), kx_hi = std::min<int64_t>(3, width - ix0);
      const int64_t offset = ix0 * channels + c0;
      for_window_taps(rows, offset, channels, kx_lo, kx_hi, [&](int t, const T* p) { acc[t] += gv * load_vec(p); });
    }
    for (int t = 0; t < kTaps; ++t) store_vec(gw + t * channels + c0, acc[t]);
  }
  for (; c0 < channels; ++c0) {
    T acc[kTaps];
    for (int t = 0; t < kTaps; ++t) acc[t] = gw[t * channels + c0];
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
void row_mean_m2_cl(const T* __restrict z, int64_t w_out, int64_t channels, T* __restrict mean,
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

// Widened (T) copies of the input rows last met, slot iy % 3, each tagged with its source row:
// consecutive output rows share two of their three input rows, so a task that walks the rows
// in order widens each input row once, not three times. Empty when scalar_t is T.
template <typename scalar_t, typename T>
struct WideRows {
  std::vector<T> buf;
  const scalar_t* tag[3] = {nullptr, nullptr, nullptr};
  explicit WideRows(const Geometry& g) : buf(std::is_same_v<scalar_t, T> ? 0 : 3 * g.w * g.c) {}
};

// The three input rows under output row oy of one image (img: (H, W, C)), as T (null = padding row).
template <typename scalar_t, typename T>
void rows_under(const scalar_t* img, const Geometry& g, int64_t oy, WideRows<scalar_t, T>& wide, const T* rows[3]) {
  const int64_t row_len = g.w * g.c;
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * g.stride - g.padding + ky;
    if (iy < 0 || iy >= g.h) {
      rows[ky] = nullptr;
      continue;
    }
    const scalar_t* src = img + iy * row_len;
    if constexpr (std::is_same_v<scalar_t, T>) {
      rows[ky] = src;
    } else {
      const int64_t slot = iy % 3;
      T* dst = wide.buf.data() + slot * row_len;
      if (wide.tag[slot] != src) {
        convert_run(src, row_len, dst);
        wide.tag[slot] = src;
      }
      rows[ky] = dst;
    }
  }
}

// Whether the row kernels prefetch the rows they read in place: not on rows narrower than 16
// pixels (the network's 12x12 and 6x6 planes), where the prefetches measured slower than
// none (a channel block's loop is a few pixels long there).
bool prefetch_rows(const Geometry& g) { return !narrow_plane(g); }

// The input row that output row oy + 1 adds to those under oy, if it lies inside the image
// and rows are prefetched; else null.
template <typename scalar_t>
const scalar_t* next_row_in_place(const scalar_t* img, const Geometry& g, int64_t oy) {
  const int64_t iy = (oy + 1) * g.stride - g.padding + 2;
  return prefetch_rows(g) && iy < g.h ? img + iy * g.w * g.c : nullptr;
}

// z[ox][c] = shift[c] + the 3x3 window of output row oy of one image, then ReLU6 when kRelu6;
// rows receives the input rows under it (as from rows_under). Rows read in place are
// prefetched (next_row_in_place); widened rows were just written.
template <bool kRelu6 = false, typename scalar_t, typename T>
void conv_row_cl(const scalar_t* img, const Geometry& g, int64_t oy, const T* w9c, const T* shift,
                 WideRows<scalar_t, T>& wide, const T* rows[3], T* z) {
  rows_under(img, g, oy, wide, rows);
  const T* next = nullptr;
  if constexpr (std::is_same_v<scalar_t, T>) next = next_row_in_place(img, g, oy);
  conv_row_cl_fused<T, kRelu6>(rows, g.w, g.c, g.padding, g.stride, w9c, shift, g.w_out, z, next);
}

#pragma GCC diagnostic pop

}  // namespace
}  // namespace dwconv_cpu
}  // namespace fercuda

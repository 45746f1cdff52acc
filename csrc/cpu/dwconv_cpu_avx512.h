// AVX-512 kernels of the fused depthwise 3x3 conv + BatchNorm + ReLU6, channels_last, written
// with intrinsics and included only by the AVX-512 paths' translation units
// (dwconv_cpu_path_avx512*.cpp), under their `#pragma GCC target`. FERCUDA_AVX512_BF16 (0 or 1)
// says whether the path may use AVX512_BF16 instructions.
//
// Register blocking. One call computes one output row of one image. For each block of 16
// channels (one vector of floats; the last block masked) the nine tap weights and the shift
// stay in registers, and the row goes in blocks of 8 output columns (the rest in one block of
// 1 to 7) with their accumulators in registers: each input column of a kernel row is loaded (and, from bfloat16,
// widened) once and multiplied into every output of the block whose window holds it, at stride
// 1 three, so a block of 8 needs 10 loads a kernel row for 24 multiply-adds instead of 24
// loads. Blocks whose windows reach past the row's ends skip the padding columns; the others
// run without a test. Per output the taps are added in the order (ky, then kx) after the
// shift, as the portable kernels add them: float32 outputs are the same bits on every path.
//
// bfloat16 rows are read in place (a zero-extending load and a shift widen 16 values), so no
// widened copy of the input is written; outputs are narrowed in registers as they are stored,
// rounding to nearest even: with vcvtneps2bf16 where AVX512_BF16 is present (it flushes
// results below bfloat16's normal range to zero, and keeps a NaN's payload), else with integer
// operations exactly as c10::BFloat16.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#ifndef FERCUDA_AVX512_BF16
#error "dwconv_cpu_avx512.h is included by an AVX-512 path, which sets FERCUDA_AVX512_BF16"
#endif

// GCC 12's AVX-512 intrinsics start their unmasked forms from _mm512_undefined_*(), which it
// then reports as maybe uninitialized wherever they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fercuda {
namespace dwconv_cpu {
namespace {
namespace avx512 {

constexpr int64_t kLanes16 = 16;

__attribute__((always_inline)) inline __mmask16 lanes_mask(int64_t n) {
  return n >= kLanes16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 values widened to float: all of them (kFull), else the first lanes of mask (a channel
// block's tail; masked loads and stores cost more than plain ones, so only the tail has them).
template <bool kFull>
__attribute__((always_inline)) inline __m512 load16(const float* p, __mmask16 m) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
template <bool kFull>
__attribute__((always_inline)) inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  // The zero-masking conversions: the plain ones start from _mm512_undefined_epi32(), which
  // GCC 12 reports as maybe uninitialized.
  const __m256i half = kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
  const __m512i bits = _mm512_maskz_cvtepu16_epi32(m, half);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(m, bits, 16));
}

// Narrowed to the output type and stored: all 16 lanes (kFull), else the first lanes of mask.
template <bool kFull>
__attribute__((always_inline)) inline void store16(float* p, __mmask16 m, __m512 v) {
  if (kFull) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}
template <bool kFull>
__attribute__((always_inline)) inline void store16(c10::BFloat16* p, __mmask16 m, __m512 v) {
#if FERCUDA_AVX512_BF16
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
#else
  // As c10::BFloat16(float): round to nearest even, any NaN to 0x7FC0.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i bits = _mm512_cvtepi32_epi16(r);
#endif
  if (kFull) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_mask_storeu_epi16(p, m, bits);
  }
}

// ReLU6 keeping NaN (max and min return their second operand when one is NaN).
__attribute__((always_inline)) inline __m512 relu6(__m512 a) {
  return _mm512_min_ps(_mm512_set1_ps(6.0f), _mm512_max_ps(_mm512_setzero_ps(), a));
}

// The walk both register blocks share: for each kernel row ky (null rows skipped) and each input
// column j of a block of B output columns at stride S whose windows start at input column ix0,
// the column's 16 channels are loaded (and widened) once and fn(v, ky, kx, i) is called for every
// tap (ky, kx) of every output i of the block whose window holds it, in order of j (kEdge: columns
// outside [0, width) skipped). A loop over i would load each column up to three times.
template <int B, int S, bool kEdge, bool kFull, typename In, typename Fn>
__attribute__((always_inline)) inline void for_each_window_tap(const In* const rows[3], int64_t ix0, int64_t width,
                                                               int64_t channels, int64_t c0, __mmask16 m, Fn fn) {
  constexpr int kCols = (B - 1) * S + 3;
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky) {
    if (rows[ky] == nullptr) continue;
    const In* base = rows[ky] + ix0 * channels + c0;
#pragma GCC unroll 24
    for (int j = 0; j < kCols; ++j) {
      if (kEdge && (ix0 + j < 0 || ix0 + j >= width)) continue;
      const __m512 v = load16<kFull>(base + j * channels, m);
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const int i = (j - kx) / S;
        if (j - kx < 0 || (j - kx) % S != 0 || i >= B) continue;
        fn(v, ky, kx, i);
      }
    }
  }
}

// B outputs of one channel block: acc[i] = shift + the 3x3 window of output column ox0 + i,
// the window's input columns starting at ix0 = ox0 * S - padding.
template <int B, int S, bool kEdge, bool kFull, typename In>
__attribute__((always_inline)) inline void window_block(const In* const rows[3], int64_t ix0, int64_t width,
                                                        int64_t channels, int64_t c0, __mmask16 m, const __m512 wv[9],
                                                        __m512 sh, __m512 acc[B]) {
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) acc[i] = sh;
  for_each_window_tap<B, S, kEdge, kFull>(
      rows, ix0, width, channels, c0, m, [&](__m512 v, int ky, int kx, int i) __attribute__((always_inline)) {
        acc[i] = _mm512_fmadd_ps(v, wv[ky * 3 + kx], acc[i]);
      });
}

template <int B, int S, bool kRelu6, bool kFull, typename In, typename Out>
__attribute__((always_inline)) inline void row_block(const In* const rows[3], int64_t ox0, int64_t width,
                                                     int64_t channels, int64_t padding, int64_t c0, __mmask16 m,
                                                     const __m512 wv[9], __m512 sh, Out* out) {
  const int64_t ix0 = ox0 * S - padding;
  __m512 acc[B];
  if (ix0 >= 0 && ix0 + (B - 1) * S + 2 < width) {
    window_block<B, S, false, kFull>(rows, ix0, width, channels, c0, m, wv, sh, acc);
  } else {
    window_block<B, S, true, kFull>(rows, ix0, width, channels, c0, m, wv, sh, acc);
  }
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) store16<kFull>(out + (ox0 + i) * channels + c0, m, kRelu6 ? relu6(acc[i]) : acc[i]);
}

// Prefetches share `block` of `blocks` equal shares of the n values at next (null: none).
template <typename In>
__attribute__((always_inline)) inline void prefetch_share(const In* next, int64_t n, int64_t block, int64_t blocks) {
  if (next == nullptr) return;
  const char* begin = reinterpret_cast<const char*>(next + n * block / blocks);
  const char* end = reinterpret_cast<const char*>(next + n * (block + 1) / blocks);
  for (const char* p = begin; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
}

// One channel block of one output row.
template <int S, bool kRelu6, bool kFull, typename In, typename Out>
__attribute__((always_inline)) inline void channel_block_row(const In* const rows[3], int64_t width, int64_t channels,
                                                             int64_t padding, const float* w9c, const float* shift,
                                                             int64_t w_out, Out* out, int64_t c0, __mmask16 m) {
  __m512 wv[9];
  for (int t = 0; t < 9; ++t) wv[t] = _mm512_maskz_loadu_ps(m, w9c + t * channels + c0);
  const __m512 sh = _mm512_maskz_loadu_ps(m, shift + c0);
  int64_t ox = 0;
  for (; ox + 8 <= w_out; ox += 8)
    row_block<8, S, kRelu6, kFull>(rows, ox, width, channels, padding, c0, m, wv, sh, out);
  // The rest in one block: its accumulators are independent chains of multiply-adds, and a
  // 6-pixel row (the network's 6x6 planes) as blocks of 4 and 2 left the FMA units waiting.
  switch (w_out - ox) {
#define FERCUDA_ROW_REST(B) \
  case B:                  \
    row_block<B, S, kRelu6, kFull>(rows, ox, width, channels, padding, c0, m, wv, sh, out); \
    break;
    FERCUDA_ROW_REST(7)
    FERCUDA_ROW_REST(6)
    FERCUDA_ROW_REST(5)
    FERCUDA_ROW_REST(4)
    FERCUDA_ROW_REST(3)
    FERCUDA_ROW_REST(2)
    FERCUDA_ROW_REST(1)
#undef FERCUDA_ROW_REST
    default:
      break;
  }
}

template <int S, bool kRelu6, typename In, typename Out>
void conv_row_strided(const In* const rows[3], int64_t width, int64_t channels, int64_t padding, const float* w9c,
                      const float* shift, int64_t w_out, Out* out, const In* next) {
  const int64_t blocks = (channels + kLanes16 - 1) / kLanes16;
  int64_t c0 = 0;
  for (; c0 + kLanes16 <= channels; c0 += kLanes16) {
    prefetch_share(next, width * channels, c0 / kLanes16, blocks);
    channel_block_row<S, kRelu6, true>(rows, width, channels, padding, w9c, shift, w_out, out, c0,
                                       static_cast<__mmask16>(0xFFFF));
  }
  if (c0 < channels) {
    prefetch_share(next, width * channels, c0 / kLanes16, blocks);
    channel_block_row<S, kRelu6, false>(rows, width, channels, padding, w9c, shift, w_out, out, c0,
                                        lanes_mask(channels - c0));
  }
}

// out[ox][c] = shift[c] + the 3x3 window of one output row (ReLU6 applied when kRelu6), from
// the three input rows under it (null: a padding row); w9c (9, C) and shift (C,) in float.
// next: the input row the next output row adds (width * channels values), prefetched a share
// per channel block: the loops read a row C values apart, a stride the hardware prefetcher
// follows poorly.
template <bool kRelu6, typename In, typename Out>
void conv_row(const In* const rows[3], int64_t width, int64_t channels, int64_t padding, int64_t stride,
              const float* w9c, const float* shift, int64_t w_out, Out* out, const In* next = nullptr) {
  if (stride == 1) {
    conv_row_strided<1, kRelu6>(rows, width, channels, padding, w9c, shift, w_out, out, next);
  } else {
    conv_row_strided<2, kRelu6>(rows, width, channels, padding, w9c, shift, w_out, out, next);
  }
}

// Per-channel mean and sum of squared deviations of one float row z[ox][c] (two passes over
// the row, which is in L1).
inline void row_mean_m2(const float* z, int64_t w_out, int64_t channels, float* mean, float* m2) {
  const __m512 inv = _mm512_set1_ps(1.0f / static_cast<float>(w_out));
  for (int64_t c0 = 0; c0 < channels; c0 += kLanes16) {
    const __mmask16 m = lanes_mask(channels - c0);
    __m512 s = _mm512_setzero_ps();
    for (int64_t ox = 0; ox < w_out; ++ox) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, z + ox * channels + c0));
    const __m512 mu = _mm512_mul_ps(s, inv);
    __m512 q = _mm512_setzero_ps();
    for (int64_t ox = 0; ox < w_out; ++ox) {
      const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, z + ox * channels + c0), mu);
      q = _mm512_fmadd_ps(d, d, q);
    }
    _mm512_mask_storeu_ps(mean + c0, m, mu);
    _mm512_mask_storeu_ps(m2 + c0, m, q);
  }
}

// ---- Backward ------------------------------------------------------------------------------

// One output row of the backward, per channel: from the conv row z (float) and the gradient
// row g, the ReLU6 mask and xhat; the row's sums of ga and ga * xhat added to sum_ga, sum_gx;
// when kGz, gz = k_ga * ga + k_xhat * xhat + k_one stored (float) and summed into sum_gz.
template <bool kGz, bool kFull, typename In>
__attribute__((always_inline)) inline void bn_relu6_grad_block(const float* z, const In* g, int64_t w_out,
                                                               int64_t channels, int64_t c0, __mmask16 m,
                                                               const float* mu, const float* is, const float* bw,
                                                               const float* bb, const float* k_ga,
                                                               const float* k_xhat, const float* k_one, float* gz,
                                                               float* sum_ga, float* sum_gx, float* sum_gz) {
  const __m512 mean = _mm512_maskz_loadu_ps(m, mu + c0), inv = _mm512_maskz_loadu_ps(m, is + c0);
  const __m512 w = _mm512_maskz_loadu_ps(m, bw + c0), b = _mm512_maskz_loadu_ps(m, bb + c0);
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
  __m512 kg = zero, kx = zero, k1 = zero;
  if (kGz) {
    kg = _mm512_maskz_loadu_ps(m, k_ga + c0);
    kx = _mm512_maskz_loadu_ps(m, k_xhat + c0);
    k1 = _mm512_maskz_loadu_ps(m, k_one + c0);
  }
  __m512 s_ga = zero, s_gx = zero, s_gz = zero;
  for (int64_t ox = 0; ox < w_out; ++ox) {
    const int64_t o = ox * channels + c0;
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load16<kFull>(z + o, m), mean), inv);
    const __m512 a = _mm512_fmadd_ps(w, xhat, b);
    const __mmask16 pass = _mm512_cmp_ps_mask(a, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(a, six, _CMP_LT_OQ);
    const __m512 ga = _mm512_maskz_mov_ps(pass, load16<kFull>(g + o, m));
    s_ga = _mm512_add_ps(s_ga, ga);
    s_gx = _mm512_fmadd_ps(ga, xhat, s_gx);
    if (kGz) {
      const __m512 d = _mm512_fmadd_ps(kg, ga, _mm512_fmadd_ps(kx, xhat, k1));
      store16<kFull>(gz + o, m, d);
      s_gz = _mm512_add_ps(s_gz, d);
    }
  }
  _mm512_mask_storeu_ps(sum_ga + c0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sum_ga + c0), s_ga));
  _mm512_mask_storeu_ps(sum_gx + c0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sum_gx + c0), s_gx));
  if (kGz) _mm512_mask_storeu_ps(sum_gz + c0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sum_gz + c0), s_gz));
}

template <bool kGz, typename In>
void bn_relu6_grad_row(const float* z, const In* g, int64_t w_out, int64_t channels, const float* mu,
                       const float* is, const float* bw, const float* bb, const float* k_ga, const float* k_xhat,
                       const float* k_one, float* gz, float* sum_ga, float* sum_gx, float* sum_gz) {
  int64_t c0 = 0;
  for (; c0 + kLanes16 <= channels; c0 += kLanes16)
    bn_relu6_grad_block<kGz, true>(z, g, w_out, channels, c0, 0xFFFF, mu, is, bw, bb, k_ga, k_xhat, k_one, gz,
                                   sum_ga, sum_gx, sum_gz);
  if (c0 < channels)
    bn_relu6_grad_block<kGz, false>(z, g, w_out, channels, c0, lanes_mask(channels - c0), mu, is, bw, bb, k_ga,
                                    k_xhat, k_one, gz, sum_ga, sum_gx, sum_gz);
}

// acc[t] += the sum over output columns ox0 .. ox0 + B - 1 of gz[ox][c] times the input under
// tap t, for one channel block: the block's gz stay in registers and each input column is loaded
// once (for_each_window_tap). Each tap's sum takes the outputs in order of ox, as a loop over ox
// would.
template <int B, int S, bool kEdge, bool kFull, typename In>
__attribute__((always_inline)) inline void grad_weight_cols(const In* const rows[3], int64_t ix0, int64_t width,
                                                            int64_t channels, int64_t c0, __mmask16 m,
                                                            const float* gz_c0, __m512 acc[9]) {
  __m512 gv[B];
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i) gv[i] = load16<kFull>(gz_c0 + i * channels, m);
  for_each_window_tap<B, S, kEdge, kFull>(
      rows, ix0, width, channels, c0, m, [&](__m512 v, int ky, int kx, int i) __attribute__((always_inline)) {
        acc[ky * 3 + kx] = _mm512_fmadd_ps(gv[i], v, acc[ky * 3 + kx]);
      });
}

template <int B, int S, bool kFull, typename In>
__attribute__((always_inline)) inline void grad_weight_at(const In* const rows[3], int64_t ox0, int64_t width,
                                                          int64_t channels, int64_t padding, int64_t c0, __mmask16 m,
                                                          const float* gz, __m512 acc[9]) {
  const int64_t ix0 = ox0 * S - padding;
  const float* gz_c0 = gz + ox0 * channels + c0;
  if (ix0 >= 0 && ix0 + (B - 1) * S + 2 < width) {
    grad_weight_cols<B, S, false, kFull>(rows, ix0, width, channels, c0, m, gz_c0, acc);
  } else {
    grad_weight_cols<B, S, true, kFull>(rows, ix0, width, channels, c0, m, gz_c0, acc);
  }
}

// gw[t][c] += the sum over one output row of gz[ox][c] times the input under tap t; the nine
// sums of a channel block stay in registers along the row, which goes in blocks of 8 output
// columns and the rest in one block, as the forward's rows do.
template <int S, bool kFull, typename In>
__attribute__((always_inline)) inline void grad_weight_block(const In* const rows[3], int64_t width, int64_t channels,
                                                             int64_t padding, const float* gz, int64_t w_out,
                                                             int64_t c0, __mmask16 m, float* gw) {
  __m512 acc[9];
  for (int t = 0; t < 9; ++t) acc[t] = _mm512_maskz_loadu_ps(m, gw + t * channels + c0);
  int64_t ox = 0;
  for (; ox + 8 <= w_out; ox += 8) grad_weight_at<8, S, kFull>(rows, ox, width, channels, padding, c0, m, gz, acc);
  switch (w_out - ox) {
#define FERCUDA_GRAD_WEIGHT_REST(B) \
  case B:                           \
    grad_weight_at<B, S, kFull>(rows, ox, width, channels, padding, c0, m, gz, acc); \
    break;
    FERCUDA_GRAD_WEIGHT_REST(7)
    FERCUDA_GRAD_WEIGHT_REST(6)
    FERCUDA_GRAD_WEIGHT_REST(5)
    FERCUDA_GRAD_WEIGHT_REST(4)
    FERCUDA_GRAD_WEIGHT_REST(3)
    FERCUDA_GRAD_WEIGHT_REST(2)
    FERCUDA_GRAD_WEIGHT_REST(1)
#undef FERCUDA_GRAD_WEIGHT_REST
    default:
      break;
  }
  for (int t = 0; t < 9; ++t) _mm512_mask_storeu_ps(gw + t * channels + c0, m, acc[t]);
}

template <int S, typename In>
void grad_weight_row_strided(const In* const rows[3], int64_t width, int64_t channels, int64_t padding,
                             const float* gz, int64_t w_out, float* gw) {
  int64_t c0 = 0;
  for (; c0 + kLanes16 <= channels; c0 += kLanes16)
    grad_weight_block<S, true>(rows, width, channels, padding, gz, w_out, c0, 0xFFFF, gw);
  if (c0 < channels)
    grad_weight_block<S, false>(rows, width, channels, padding, gz, w_out, c0, lanes_mask(channels - c0), gw);
}

// stride 1 or 2 (the op's strides).
template <typename In>
void grad_weight_row(const In* const rows[3], int64_t width, int64_t channels, int64_t padding, int64_t stride,
                     const float* gz, int64_t w_out, float* gw) {
  if (stride == 1) {
    grad_weight_row_strided<1>(rows, width, channels, padding, gz, w_out, gw);
  } else {
    grad_weight_row_strided<2>(rows, width, channels, padding, gz, w_out, gw);
  }
}

// dst[i] = src[i] narrowed to Out (a copy for float).
template <typename Out>
void convert_row(const float* src, int64_t n, Out* dst) {
  int64_t i = 0;
  for (; i + kLanes16 <= n; i += kLanes16) store16<true>(dst + i, 0xFFFF, _mm512_loadu_ps(src + i));
  if (i < n) store16<false>(dst + i, lanes_mask(n - i), _mm512_maskz_loadu_ps(lanes_mask(n - i), src + i));
}

// y[p][c] = relu6(z[p][c] * scale[c] + shift[c]) for `pixels` rows of C channels, along memory
// (scale and shift stay in L1); z float, or y itself (in place).
template <typename S, typename T>
void scale_shift_relu6(const S* z, T* y, int64_t pixels, int64_t channels, const float* scale, const float* shift) {
  for (int64_t p = 0; p < pixels; ++p) {
    const S* src = z + p * channels;
    T* row = y + p * channels;
    int64_t c0 = 0;
    for (; c0 + kLanes16 <= channels; c0 += kLanes16) {
      const __m512 v = _mm512_fmadd_ps(load16<true>(src + c0, 0xFFFF), _mm512_loadu_ps(scale + c0),
                                       _mm512_loadu_ps(shift + c0));
      store16<true>(row + c0, 0xFFFF, relu6(v));
    }
    if (c0 < channels) {
      const __mmask16 m = lanes_mask(channels - c0);
      const __m512 v = _mm512_fmadd_ps(load16<false>(src + c0, m), _mm512_maskz_loadu_ps(m, scale + c0),
                                       _mm512_maskz_loadu_ps(m, shift + c0));
      store16<false>(row + c0, m, relu6(v));
    }
  }
}

// The three input rows under output row oy of one image (img: (H, W, C)); null = padding.
// Returns the row that output row oy + 1 adds, where it lies in the image and the rows are
// wide enough to gain from its prefetch (16 pixels: on the network's 12x12 and 6x6 planes a
// channel block's loop is too short), else null.
template <typename In>
const In* rows_under(const In* img, int64_t h, int64_t width, int64_t row_len, int64_t stride, int64_t padding,
                     int64_t oy, const In* rows[3]) {
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = oy * stride - padding + ky;
    rows[ky] = (iy < 0 || iy >= h) ? nullptr : img + iy * row_len;
  }
  const int64_t next = (oy + 1) * stride - padding + 2;
  return width >= 16 && next < h ? img + next * row_len : nullptr;
}

}  // namespace avx512
}  // namespace
}  // namespace dwconv_cpu
}  // namespace fercuda

#pragma GCC diagnostic pop

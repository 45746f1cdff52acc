// The compute of the fused depthwise conv + BatchNorm + ReLU6 on the CPU, compiled once per
// instruction-set path: a path's translation unit (dwconv_cpu_path_*.cpp) includes every
// library header first, then this file under its `#pragma GCC target`, with
// FERCUDA_DWCONV_PATH_FN naming its Path. Everything here has internal linkage, so each path's
// copy stays its own (no inline function compiled for a wider instruction set can stand in
// for another's).
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
// Reductions are deterministic: per-plane (per-row, per-image) partials land in fixed slots
// and are combined in a fixed order in double precision (chan_merge, sum_over_batch).
#ifndef FERCUDA_DWCONV_PATH_FN
#error "dwconv_cpu_compute.h is included by a path's translation unit, which names its Path"
#endif

#include "dwconv_cpu_kernels.h"
#ifdef FERCUDA_AVX512_BF16
#include "dwconv_cpu_avx512.h"
#endif

namespace fercuda {
namespace dwconv_cpu {
namespace {

// (C, 9) -> (9, C): the channels_last loops read one tap for all channels.
at::Tensor taps_major(const at::Tensor& w) { return w.t().contiguous(); }

// ---- y = relu6(conv(x, w_folded) + shift): inference, and training's pass 2 --------------

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
      conv_plane(xd + p * plane_in, g, w_folded + c * kTaps, shift[c], len, xp.data(), z.data());
      store_relu6_wide(z.data(), g.wp(), g.h_out, g.w_out, index.empty() ? nullptr : index.data(),
                       yd + p * plane_out);
    }
  });
}

// channels_last: visits every output row (n, oy) with its conv output z[ox][c] =
// shift[c] + sum of w9c taps; fn(row_index, z).
template <typename scalar_t, typename T, typename Fn>
void for_each_conv_row_cl(const at::Tensor& x, const T* w9c, const T* shift, const Geometry& g, Fn fn) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.n * g.h_out, 1, [&](int64_t begin, int64_t end) {
    WideRows<scalar_t, T> buf(g);
    std::vector<T> z(g.w_out * g.c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.h_out, oy = r % g.h_out;
      const T* rows[3];
      conv_row_cl(xd + n * g.h * g.w * g.c, g, oy, w9c, shift, buf, rows, z.data());
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
      WideRows<T, T> buf(g);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / g.h_out, oy = r % g.h_out;
        const T* rows[3];
        conv_row_cl<true>(xd + n * g.h * g.w * g.c, g, oy, w9c, shift, buf, rows, yd + r * row_out);
      }
    });
  } else {
    for_each_conv_row_cl<scalar_t, T>(x, w9c, shift, g, [&](int64_t r, T* z) {
      scalar_t* out = yd + r * row_out;
      relu6_convert_run(z, row_out, out);
    });
  }
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

// ---- Training pass 1: batch mean and biased variance of the conv output -------------------

// Chan's combination of the parts' statistics (part r of channel c at pm[r * C + c]), the
// channels in parallel.
template <typename P>
void merge_batch_stats(const P* pm, const P* pq, int64_t parts, int64_t part_count, const Geometry& g, double* mean,
                       double* var) {
  const int64_t count = g.n * g.h_out * g.w_out;
  at::parallel_for(0, g.c, 64, [&](int64_t begin, int64_t end) {
    chan_merge(pm, pq, parts, g.c, part_count, count, begin, end, mean, var);
  });
}

// sum_over_batch with the channels in parallel (each channel's sum in the same order).
template <typename P>
void sum_over_batch_parallel(const P* part, const SlotLayout& l, int64_t n, int64_t channels, int first, int last,
                             double* sums) {
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    sum_over_batch(part, l, n, begin, end, first, last, sums);
  });
}

// NCHW: per-plane mean / M2 (the wide plane's scratch entries masked out).
template <typename scalar_t, typename T>
void batch_stats_nchw(const at::Tensor& x, const ChannelParams& p, const Geometry& g, double* mean, double* var,
                      at::Tensor& z_keep) {
  T* zd = z_keep.defined() ? z_keep.mutable_data_ptr<T>() : nullptr;
  const T* w = p.w.template const_data_ptr<T>();
  const T* b = p.b.template const_data_ptr<T>();
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
      conv_plane(xd + q * g.h * g.w, g, w + c * kTaps, b[c], len, xp.data(), z.data());
      mean_m2_wide(z.data(), valid.data(), len, plane_out, pm[q], pq[q]);
      if (zd != nullptr)
        for (int64_t oy = 0; oy < g.h_out; ++oy)
          std::copy(z.data() + oy * g.wp(), z.data() + oy * g.wp() + g.w_out, zd + q * plane_out + oy * g.w_out);
    }
  });
  merge_batch_stats(pm.data(), pq.data(), g.n, plane_out, g, mean, var);
}

// channels_last: per-row mean / M2.
template <typename scalar_t, typename T>
void batch_stats_cl(const at::Tensor& x, const ChannelParams& p, const Geometry& g, double* mean, double* var,
                    at::Tensor& z_keep) {
  T* zd = z_keep.defined() ? z_keep.mutable_data_ptr<T>() : nullptr;
  const int64_t row_out = g.w_out * g.c;
  at::Tensor part_mean = at::empty({g.n * g.h_out, g.c}, p.w.options());
  at::Tensor part_m2 = at::empty({g.n * g.h_out, g.c}, p.w.options());
  T* pm = part_mean.mutable_data_ptr<T>();
  T* pq = part_m2.mutable_data_ptr<T>();
  const at::Tensor w9c = taps_major(p.w);
  for_each_conv_row_cl<scalar_t, T>(x, w9c.const_data_ptr<T>(), p.b.template const_data_ptr<T>(), g,
                                    [&](int64_t r, T* z) {
                                      row_mean_m2_cl(z, g.w_out, g.c, pm + r * g.c, pq + r * g.c);
                                      if (zd != nullptr) std::copy(z, z + row_out, zd + r * row_out);
                                    });
  merge_batch_stats(pm, pq, g.n * g.h_out, g.w_out, g, mean, var);
}

// ---- Backward -----------------------------------------------------------------------------
//
// Both layouts: pass 1 (training only) reduces sum(ga) and sum(ga * xhat) from the recomputed
// conv; pass 2 recomputes it again, forms gz with the grad_weight / grad_bias sums, and writes
// grad_x. sd is (C, kSlots), in the kSlots order.

// NCHW, one task per plane: per-plane partials, reduced over the batch.
template <typename scalar_t, typename T>
void backward_nchw(const at::Tensor& x, const at::Tensor& grad_out, const ChannelParams& p, const T* mu,
                   const T* is, const Geometry& g, bool training, double count, at::Tensor& grad_x, double* sd) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
  const T* w = p.w.template const_data_ptr<T>();
  const T* b = p.b.template const_data_ptr<T>();
  const T* bw = p.bn_w.template const_data_ptr<T>();
  const T* bb = p.bn_b.template const_data_ptr<T>();
  const int64_t planes = g.n * g.c;
  const int64_t plane_in = g.h * g.w, plane_out = g.h_out * g.w_out;
  const int64_t len = wide_len(g);
  std::vector<double> part(planes * kSlots);  // plane q's slot s at q * kSlots + s
  const SlotLayout layout{g.c * kSlots, kSlots, 1};
  if (training) {
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> xp = padded_buffer<T>(g), gwide = padded_buffer<T>(g), z(len);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t c = q % g.c;
        conv_plane(xd + q * plane_in, g, w + c * kTaps, b[c], len, xp.data(), z.data());
        load_wide_plane(gd + q * plane_out, g, gwide.data());
        T s_ga, s_gx;
        bn_relu6_grad_wide<T>(z.data(), gwide.data(), len, mu[c], is[c], bw[c], bb[c], {}, nullptr, s_ga, s_gx);
        part[q * kSlots + 0] = s_ga;
        part[q * kSlots + 1] = s_gx;
      }
    });
    sum_over_batch_parallel(part.data(), layout, g.n, g.c, 0, 2, sd);
  }
  const std::vector<dwconv::BNBackward<T>> coeffs = backward_coeffs(bw, is, sd, count, training, g.c);
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
      conv_plane(xd + q * plane_in, g, w + c * kTaps, b[c], len, xp.data(), z.data());
      load_wide_plane(gd + q * plane_out, g, gwide.data());
      T s_ga, s_gx;
      bn_relu6_grad_wide<T>(z.data(), gwide.data(), len, mu[c], is[c], bw[c], bb[c], coeffs[c], gz, s_ga, s_gx);
      // Scratch entries: no gradient (training's gz has a constant term there).
      for (int64_t oy = 0; oy + 1 < g.h_out; ++oy) std::fill(gz + oy * g.wp() + g.w_out, gz + (oy + 1) * g.wp(), T(0));
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
  sum_over_batch_parallel(part.data(), layout, g.n, g.c, training ? 2 : 0, kSlots, sd);
}

// channels_last, native (no NCHW copies): one task per image, vectorized along C, so the
// network's 6x6 planes of many channels run as long vector loops; pass 2 keeps the image's gz
// (H_out, W_out, C) and writes grad_x row by row as a gather from it. Per-image partials.
template <typename scalar_t, typename T>
void backward_cl(const at::Tensor& x, const at::Tensor& grad_out, const ChannelParams& p, const T* mu,
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
  std::vector<double> part(g.n * kSlots * C);  // image n's slot s of channel c at (n * kSlots + s) * C + c
  const SlotLayout layout{kSlots * C, 1, C};
  // Per-thread rows: x rows widened (when scalar_t is not T), conv row, gradient row widened,
  // and the image's sums in T (slot s of channel c at s * C + c, as in part), summed row by
  // row and added to part once per image.
  struct Rows {
    WideRows<scalar_t, T> xbuf;
    std::vector<T> z, gbuf, sums;
    Rows(const Geometry& g, bool widen)
        : xbuf(g), z(g.w_out * g.c), gbuf(widen ? g.w_out * g.c : 0), sums(kSlots * g.c) {}
  };
  constexpr bool kWiden = !std::is_same_v<scalar_t, T>;
  // The gradient row after (n, oy) in the image, prefetched where it is read in place.
  auto next_grad_row = [&](int64_t n, int64_t oy) -> const T* {
    if constexpr (kWiden) {
      return nullptr;
    } else {
      return prefetch_rows(g) && oy + 1 < g.h_out ? gd + (n * g.h_out + oy + 1) * row_out : nullptr;
    }
  };
  if (training) {
    at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
      Rows r(g, kWiden);
      T* const s_ga = r.sums.data();
      T* const s_gx = s_ga + C;
      for (int64_t n = begin; n < end; ++n) {
        std::fill(s_ga, s_ga + 2 * C, T(0));
        for (int64_t oy = 0; oy < g.h_out; ++oy) {
          const T* rows[3];
          conv_row_cl(xd + n * g.h * row_in, g, oy, w9c, b, r.xbuf, rows, r.z.data());
          const T* gr = load_as(gd + (n * g.h_out + oy) * row_out, row_out, r.gbuf.data());
          bn_relu6_grad_row_cl<T, false>(r.z.data(), gr, g.w_out, C, mu, is, bw, bb, nullptr, nullptr, nullptr,
                                         nullptr, s_ga, s_gx, nullptr, next_grad_row(n, oy));
        }
        std::copy(s_ga, s_ga + 2 * C, part.data() + n * kSlots * C);
      }
    });
    sum_over_batch_parallel(part.data(), layout, g.n, C, 0, 2, sd);
  }
  // The coefficients as (C,) vectors, for the loops along C.
  std::vector<T> k_ga(C), k_xhat(C), k_one(C);
  {
    const std::vector<dwconv::BNBackward<T>> coeffs = backward_coeffs(bw, is, sd, count, training, C);
    for (int64_t c = 0; c < C; ++c) {
      k_ga[c] = coeffs[c].k_ga;
      k_xhat[c] = coeffs[c].k_xhat;
      k_one[c] = coeffs[c].k_one;
    }
  }
  // Training has its sums of ga and ga * xhat from pass 1: pass 2 adds the rest.
  const int first = training ? 2 : 0;
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    Rows r(g, kWiden);
    std::vector<T> gz(g.h_out * row_out), gx_row(kWiden ? row_in : 0);
    T* const s_ga = r.sums.data();
    T* const s_gx = s_ga + C;
    T* const s_gz = s_ga + 2 * C;
    T* const s_gw = s_ga + 3 * C;
    for (int64_t n = begin; n < end; ++n) {
      std::fill(r.sums.begin(), r.sums.end(), T(0));
      const scalar_t* img = xd + n * g.h * row_in;
      for (int64_t oy = 0; oy < g.h_out; ++oy) {
        const T* rows[3];
        conv_row_cl(img, g, oy, w9c, b, r.xbuf, rows, r.z.data());
        const T* gr = load_as(gd + (n * g.h_out + oy) * row_out, row_out, r.gbuf.data());
        T* gzr = gz.data() + oy * row_out;
        bn_relu6_grad_row_cl<T, true>(r.z.data(), gr, g.w_out, C, mu, is, bw, bb, k_ga.data(), k_xhat.data(),
                                      k_one.data(), gzr, s_ga, s_gx, s_gz, next_grad_row(n, oy));
        grad_weight_row_cl(rows, g.w, C, g.padding, g.stride, gzr, g.w_out, s_gw);
      }
      std::copy(r.sums.begin() + first * C, r.sums.end(), part.data() + (n * kSlots + first) * C);
      for (int64_t iy = 0; iy < g.h; ++iy) {
        scalar_t* dst = gxd + (n * g.h + iy) * row_in;
        if constexpr (kWiden) {
          grad_input_row_cl(gz.data(), g.h_out, g.w_out, iy, g.w, C, g.padding, g.stride, w9c, gx_row.data());
          convert_run(gx_row.data(), row_in, dst);
        } else {
          grad_input_row_cl(gz.data(), g.h_out, g.w_out, iy, g.w, C, g.padding, g.stride, w9c, dst);
        }
      }
    }
  });
  sum_over_batch_parallel(part.data(), layout, g.n, C, training ? 2 : 0, kSlots, sd);
}

#ifdef FERCUDA_AVX512_BF16
// ---- AVX-512 paths: channels_last float32 and bfloat16 through dwconv_cpu_avx512.h ---------------
//
// Both read x in place (bfloat16 widened in registers); one task per output row (n, oy).

// fn.template operator()<scalar_t>() for x's dtype, float32 or bfloat16.
template <typename Fn>
void dispatch_avx512(at::ScalarType dtype, Fn fn) {
  if (dtype == at::kFloat) {
    fn.template operator()<float>();
  } else {
    fn.template operator()<c10::BFloat16>();
  }
}

template <bool kRelu6, typename scalar_t, typename Out, typename Fn>
void for_each_row_avx512(const at::Tensor& x, const float* w9c, const float* shift, const Geometry& g, Out* out,
                         int64_t out_row_stride, Fn after_row) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const int64_t row_in = g.w * g.c;
  at::parallel_for(0, g.n * g.h_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.h_out, oy = r % g.h_out;
      const scalar_t* rows[3];
      const scalar_t* next = avx512::rows_under(xd + n * g.h * row_in, g.h, g.w, row_in, g.stride, g.padding, oy, rows);
      Out* o = out + (out_row_stride == 0 ? 0 : r * out_row_stride);
      avx512::conv_row<kRelu6>(rows, g.w, g.c, g.padding, g.stride, w9c, shift, g.w_out, o, next);
      after_row(r, o);
    }
  });
}

// Whether the AVX-512 row kernel takes this forward: channels_last bfloat16 (read in place
// where the portable path widens every row into a copy), and float32 rows narrower than 16
// pixels; float32 rows of 16 pixels and more measured no faster than the AVX2 path's kernel,
// which they keep (BENCHMARKS.md).
bool avx512_forward(const at::Tensor& x, const Geometry& g, bool channels_last) {
  const auto dtype = x.scalar_type();
  return channels_last && (dtype == at::kBFloat16 || (dtype == at::kFloat && g.w_out < 16));
}

void affine_relu6_avx512_entry(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& shift, const Geometry& g,
                               bool channels_last, at::Tensor& y) {
  const auto dtype = x.scalar_type();
  if (!avx512_forward(x, g, channels_last)) {
    path_avx2().affine_relu6(x, wf, shift, g, channels_last, y);
    return;
  }
  const at::Tensor w9c = taps_major(wf);
  dispatch_avx512(dtype, [&]<typename scalar_t>() {
    for_each_row_avx512<true, scalar_t>(x, w9c.const_data_ptr<float>(), shift.const_data_ptr<float>(), g,
                                        y.mutable_data_ptr<scalar_t>(), g.w_out * g.c, [](int64_t, scalar_t*) {});
  });
}

// Pass 1 of the training forward writes the float conv output into z_keep where the op keeps
// it for the backward, else into y (narrowed to y's dtype, as the eager block's conv output
// is); pass 2 normalizes it instead of computing the conv again. The statistics come from the
// float z.
bool batch_stats_avx512_entry(const at::Tensor& x, const ChannelParams& p, const Geometry& g, bool channels_last,
                              double* mean, double* var, at::Tensor& z_keep, at::Tensor& y) {
  const auto dtype = x.scalar_type();
  if (!avx512_forward(x, g, channels_last))
    return path_avx2().batch_stats(x, p, g, channels_last, mean, var, z_keep, y);
  float* const zk = z_keep.defined() ? z_keep.mutable_data_ptr<float>() : nullptr;
  // Per-row mean / M2 of the float conv row (in a per-thread buffer), merged by Chan's rule.
  at::Tensor part_mean = at::empty({g.n * g.h_out, g.c}, p.w.options());
  at::Tensor part_m2 = at::empty({g.n * g.h_out, g.c}, p.w.options());
  float* pm = part_mean.mutable_data_ptr<float>();
  float* pq = part_m2.mutable_data_ptr<float>();
  const at::Tensor w9c = taps_major(p.w);
  dispatch_avx512(dtype, [&]<typename scalar_t>() {
    {
      const float* wd = w9c.const_data_ptr<float>();
      scalar_t* yd = y.mutable_data_ptr<scalar_t>();
      const float* bd = p.b.const_data_ptr<float>();
      const scalar_t* xd = x.const_data_ptr<scalar_t>();
      const int64_t row_in = g.w * g.c;
      at::parallel_for(0, g.n * g.h_out, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> z_row(zk != nullptr ? 0 : g.w_out * g.c);
        for (int64_t r = begin; r < end; ++r) {
          float* z = zk != nullptr ? zk + r * g.w_out * g.c : z_row.data();
          const int64_t n = r / g.h_out, oy = r % g.h_out;
          const scalar_t* rows[3];
          const scalar_t* next = avx512::rows_under(xd + n * g.h * row_in, g.h, g.w, row_in, g.stride, g.padding,
                                                    oy, rows);
          avx512::conv_row<false>(rows, g.w, g.c, g.padding, g.stride, wd, bd, g.w_out, z, next);
          avx512::row_mean_m2(z, g.w_out, g.c, pm + r * g.c, pq + r * g.c);
          if (zk == nullptr) avx512::convert_row(z, g.w_out * g.c, yd + r * g.w_out * g.c);
        }
      });
    }
  });
  merge_batch_stats(pm, pq, g.n * g.h_out, g.w_out, g, mean, var);
  return true;
}

void normalize_relu6_avx512_entry(const at::Tensor& src, at::Tensor& y, const at::Tensor& scale,
                                  const at::Tensor& shift, const Geometry& g) {
  const float* sc = scale.const_data_ptr<float>();
  const float* sh = shift.const_data_ptr<float>();
  dispatch_avx512(y.scalar_type(), [&]<typename scalar_t>() {
    scalar_t* yd = y.mutable_data_ptr<scalar_t>();
    const int64_t pixels = g.n * g.h_out * g.w_out;
    auto run = [&](const auto* sd) {
      at::parallel_for(0, pixels, 64, [&](int64_t begin, int64_t end) {
        avx512::scale_shift_relu6(sd + begin * g.c, yd + begin * g.c, end - begin, g.c, sc, sh);
      });
    };
    if (src.scalar_type() == at::kFloat) {
      run(src.const_data_ptr<float>());
    } else {
      run(src.const_data_ptr<scalar_t>());
    }
  });
}
// The largest conv output (in floats: 8 MiB) that the backward keeps between its passes.
constexpr int64_t kKeepZFloats = kKeepZValues;

// channels_last backward, one task per image as backward_cl, with the AVX-512 row kernels:
// x and grad_out read in place (bfloat16 widened in registers), and grad_x of stride 1 as the
// conv of gz with the taps mirrored (conv_row), narrowed as it is stored. z_saved (the train
// op's float conv output, the same values the conv would give) is read where given; else the
// conv is computed again.
template <typename scalar_t>
void backward_cl_avx512(const at::Tensor& x, const at::Tensor& z_saved, const at::Tensor& grad_out,
                        const ChannelParams& p, const float* mu, const float* is, const Geometry& g, bool training,
                        double count, at::Tensor& grad_x, double* sd) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const float* zs = z_saved.defined() ? z_saved.const_data_ptr<float>() : nullptr;
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
  const int64_t C = g.c, row_in = g.w * C, row_out = g.w_out * C;
  const at::Tensor w9c_t = taps_major(p.w);
  const float* w9c = w9c_t.const_data_ptr<float>();
  const float* b = p.b.const_data_ptr<float>();
  const float* bw = p.bn_w.const_data_ptr<float>();
  const float* bb = p.bn_b.const_data_ptr<float>();
  // Image n's slot s of channel c at (n * kSlots + s) * C + c: the image's float sums, widened
  // exactly when they are added over the batch. Uninitialized: the passes write every slot read.
  const std::unique_ptr<float[]> part_buf(new float[g.n * kSlots * C]);
  float* const part = part_buf.get();
  const SlotLayout layout{kSlots * C, 1, C};
  // The conv row of output row oy of image n, and the input rows under it.
  auto conv_z = [&](int64_t n, int64_t oy, const scalar_t* rows[3], float* z) {
    const scalar_t* next =
        avx512::rows_under(xd + n * g.h * row_in, g.h, g.w, row_in, g.stride, g.padding, oy, rows);
    avx512::conv_row<false>(rows, g.w, C, g.padding, g.stride, w9c, b, g.w_out, z, next);
  };
  // Training's pass 1 keeps the conv output for pass 2 where it is small enough to stay in
  // cache (the network's 6x6 and 12x12 planes), instead of pass 2 computing it again.
  const bool keep_z = zs == nullptr && training && g.n * g.h_out * row_out <= kKeepZFloats;
  // Uninitialized: pass 1 writes every value.
  const at::Tensor z_all_t = at::empty({keep_z ? g.n * g.h_out * row_out : 0}, p.w.options());
  float* const z_all = z_all_t.mutable_data_ptr<float>();
  if (training) {
    at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> z_row(keep_z ? 0 : row_out), sums(2 * C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(sums.begin(), sums.end(), 0.0f);
        for (int64_t oy = 0; oy < g.h_out; ++oy) {
          const int64_t r = n * g.h_out + oy;
          const float* z = zs + r * row_out;
          if (zs == nullptr) {
            const scalar_t* rows[3];
            float* zw = keep_z ? z_all + r * row_out : z_row.data();
            conv_z(n, oy, rows, zw);
            z = zw;
          }
          avx512::bn_relu6_grad_row<false>(z, gd + r * row_out, g.w_out, C, mu, is, bw, bb, nullptr, nullptr,
                                           nullptr, nullptr, sums.data(), sums.data() + C, nullptr);
        }
        std::copy(sums.begin(), sums.end(), part + n * kSlots * C);
      }
    });
    sum_over_batch_parallel(part, layout, g.n, C, 0, 2, sd);
  }
  std::vector<float> k_ga(C), k_xhat(C), k_one(C);
  {
    const std::vector<dwconv::BNBackward<float>> coeffs = backward_coeffs(bw, is, sd, count, training, C);
    for (int64_t c = 0; c < C; ++c) {
      k_ga[c] = coeffs[c].k_ga;
      k_xhat[c] = coeffs[c].k_xhat;
      k_one[c] = coeffs[c].k_one;
    }
  }
  // grad_x of stride 1: gx[iy][ix] = sum over (ky, kx) of gz[iy + padding - ky][ix + padding - kx] * w[ky][kx],
  // conv_row's window with padding 2 - padding over gz rows and the kx taps mirrored.
  const bool mirrored = g.stride == 1 && g.padding <= 2;
  std::vector<float> w_mirror(kTaps * C), zero_shift(C, 0.0f);
  for (int t = 0; t < kTaps; ++t)
    std::copy(w9c + (t / 3 * 3 + 2 - t % 3) * C, w9c + (t / 3 * 3 + 3 - t % 3) * C, w_mirror.data() + t * C);
  const int first = training ? 2 : 0;
  // Pass 2 takes the images in the reverse order of pass 1 (task i: image N - 1 - i), so it
  // starts on the images whose x, z and grad_out pass 1 left in the cache last.
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(row_out), gz(g.h_out * row_out), sums(kSlots * C), gx_row(mirrored ? 0 : row_in);
    float* const s_ga = sums.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = training ? g.n - 1 - task : task;
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t oy = 0; oy < g.h_out; ++oy) {
        const scalar_t* rows[3];
        const int64_t r = n * g.h_out + oy;
        const float* zr = zs != nullptr ? zs + r * row_out : z_all + r * row_out;
        if (zs != nullptr || keep_z) {
          avx512::rows_under(xd + n * g.h * row_in, g.h, g.w, row_in, g.stride, g.padding, oy, rows);
        } else {
          conv_z(n, oy, rows, z.data());
          zr = z.data();
        }
        float* gzr = gz.data() + oy * row_out;
        avx512::bn_relu6_grad_row<true>(zr, gd + r * row_out, g.w_out, C, mu, is, bw, bb, k_ga.data(),
                                        k_xhat.data(), k_one.data(), gzr, s_ga, s_ga + C, s_ga + 2 * C);
        avx512::grad_weight_row(rows, g.w, C, g.padding, g.stride, gzr, g.w_out, s_ga + 3 * C);
      }
      std::copy(sums.begin() + first * C, sums.end(), part + (n * kSlots + first) * C);
      for (int64_t iy = 0; iy < g.h; ++iy) {
        scalar_t* dst = gxd + (n * g.h + iy) * row_in;
        if (mirrored) {
          const float* grows[3];
          for (int ky = 0; ky < 3; ++ky) {
            const int64_t oy = iy + g.padding - ky;
            grows[ky] = (oy < 0 || oy >= g.h_out) ? nullptr : gz.data() + oy * row_out;
          }
          avx512::conv_row<false>(grows, g.w_out, C, 2 - g.padding, 1, w_mirror.data(), zero_shift.data(), g.w, dst);
        } else {
          grad_input_row_cl(gz.data(), g.h_out, g.w_out, iy, g.w, C, g.padding, g.stride, w9c, gx_row.data());
          avx512::convert_row(gx_row.data(), row_in, dst);
        }
      }
    }
  });
  sum_over_batch_parallel(part, layout, g.n, C, first, kSlots, sd);
}

void backward_avx512_entry(const at::Tensor& x, const at::Tensor& z, const at::Tensor& grad_out,
                           const ChannelParams& p, const at::Tensor& mean, const at::Tensor& invstd, const Geometry& g,
                           bool channels_last, bool training, double count, at::Tensor& grad_x, double* sums) {
  if (!avx512_forward(x, g, channels_last)) {
    path_avx2().backward(x, z, grad_out, p, mean, invstd, g, channels_last, training, count, grad_x, sums);
    return;
  }
  dispatch_avx512(x.scalar_type(), [&]<typename scalar_t>() {
    backward_cl_avx512<scalar_t>(x, z, grad_out, p, mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(), g,
                                 training, count, grad_x, sums);
  });
}
#endif  // FERCUDA_AVX512_BF16

// ---- The path's entry points: dtype dispatch --------------------------------------------------

#ifndef FERCUDA_AVX512_BF16

void affine_relu6_entry(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& shift, const Geometry& g,
                        bool channels_last, at::Tensor& y) {
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6", [&] {
    affine_relu6<scalar_t>(x, wf, shift, g, channels_last, y);
  });
}

bool batch_stats_entry(const at::Tensor& x, const ChannelParams& p, const Geometry& g, bool channels_last,
                       double* mean, double* var, at::Tensor& z, at::Tensor& /*y: left alone*/) {
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_train", [&] {
    using T = acc_type_t<scalar_t>;
    if (channels_last) {
      batch_stats_cl<scalar_t, T>(x, p, g, mean, var, z);
    } else {
      batch_stats_nchw<scalar_t, T>(x, p, g, mean, var, z);
    }
  });
  return false;
}

// z is not read: the portable kernels compute the conv again, in the accumulation type.
void backward_entry(const at::Tensor& x, const at::Tensor& /*z*/, const at::Tensor& grad_out, const ChannelParams& p,
                    const at::Tensor& mean, const at::Tensor& invstd, const Geometry& g, bool channels_last,
                    bool training, double count, at::Tensor& grad_x, double* sums) {
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_backward", [&] {
    using T = acc_type_t<scalar_t>;
    const T* mu = mean.const_data_ptr<T>();
    const T* is = invstd.const_data_ptr<T>();
    if (channels_last) {
      backward_cl<scalar_t, T>(x, grad_out, p, mu, is, g, training, count, grad_x, sums);
    } else {
      backward_nchw<scalar_t, T>(x, grad_out, p, mu, is, g, training, count, grad_x, sums);
    }
  });
}

#endif  // !FERCUDA_AVX512_BF16

}  // namespace

const Path& FERCUDA_DWCONV_PATH_FN() {
#ifdef FERCUDA_AVX512_BF16
  // The AVX-512 kernels cover channels_last where avx512_forward says; the rest runs the AVX2
  // path's code, which measured faster than the same portable code compiled for AVX-512.
  static const Path path{affine_relu6_avx512_entry, batch_stats_avx512_entry, normalize_relu6_avx512_entry,
                         backward_avx512_entry};
#else
  static const Path path{affine_relu6_entry, batch_stats_entry, nullptr, backward_entry};
#endif
  return path;
}

}  // namespace dwconv_cpu
}  // namespace fercuda

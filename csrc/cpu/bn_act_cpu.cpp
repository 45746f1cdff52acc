// The CPU ops of BatchNorm + ReLU6 (or identity) + residual add (schemas in csrc/ops.cpp): argument
// checks, allocation, dtype dispatch and the parallel loops; the loops themselves are in
// bn_act_cpu_kernels.h.
//
// Passes over memory (x, y, the residual and gradients; the (C,) vectors do not count):
//  inference  1 pass:   y = act(x * scale + shift) + residual.
//  training   2 passes: per-channel mean and variance (pass 1), then the inference pass with the
//             batch statistics.
//  backward   2 passes: sum(ga) and sum(ga * xhat) per channel (they are grad_bias and
//             grad_weight, and grad_x needs them with batch statistics), then grad_x.
//
// Reductions are deterministic and independent of the thread count: the tensor is cut into parts
// by its shape alone (NCHW: chunks of a plane; channels_last: chunks of rows), each part reduced
// in the accumulation type in a fixed order, and the parts merged per channel in double precision
// in part order (Chan's combination for the variance).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "bn_act_cpu_kernels.h"
#include "fercuda/checks.h"

// The kernels' 64-byte vectors never cross a call (always inlined); GCC reports the ABI of their
// instantiations in the baseline clone at the end of this file.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fercuda {
namespace {

using namespace bn_act_cpu;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Values a part of a reduction holds: small enough to stay in L1/L2 between its two sweeps.
constexpr int64_t kPartValues = 8192;
// channels_last: the least values a kernel row holds (a row of 8 channels alone is all loop
// overhead and vector tails): image rows are taken `tile` at a time.
constexpr int64_t kMinRun = 128;

// How a (N, C, H, W) tensor is cut into parts: NCHW, each plane into `chunks` runs of at most
// `chunk` values (part q = plane * chunks + k); channels_last, the N * H * W rows into runs of
// `chunk` rows (part q = run), a multiple of `tile`, the image rows a kernel row holds.
struct Layout {
  bool cl;
  int64_t n, c, hw;
  int64_t chunk, chunks, parts;
  int64_t tile;

  PlaneRuns plane_runs() const { return {hw, chunk, chunks, c}; }

  int64_t positions() const { return n * hw; }
  // Values of channel c in part q (every channel has the same count in a part).
  int64_t part_count(int64_t q) const {
    const int64_t k = cl ? q : q % chunks;
    const int64_t total = cl ? positions() : hw;
    return std::min(chunk, total - k * chunk);
  }
};

Layout layout_of(const at::Tensor& x, bool cl) {
  Layout l{cl, x.size(0), x.size(1), x.size(2) * x.size(3), 0, 0, 0, 1};
  if (cl) {
    l.tile = l.c >= kMinRun ? 1 : (kMinRun + l.c - 1) / l.c;
    const int64_t rows = std::max<int64_t>(l.tile, kPartValues / (l.c * l.tile) * l.tile);
    l.chunk = std::max<int64_t>(1, std::min(l.positions(), rows));
    l.chunks = (l.positions() + l.chunk - 1) / l.chunk;
    l.parts = l.chunks;
  } else {
    l.chunk = std::max<int64_t>(1, std::min(l.hw, kPartValues));
    l.chunks = (l.hw + l.chunk - 1) / l.chunk;
    l.parts = l.n * l.c * l.chunks;
  }
  return l;
}

// Grain of parallel_for over planes / rows: about kPartValues values a task.
int64_t grain(int64_t values_per_item) { return std::max<int64_t>(1, kPartValues / std::max<int64_t>(values_per_item, 1)); }

at::Tensor as_layout(const at::Tensor& t, bool cl) {
  return cl ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// The (C,) tensors are read and written with plain loops: a handful of ATen ops on them would
// cost more than the kernels at the network's smaller shapes.

// A (C,) tensor's values as double, whatever its floating dtype and stride.
std::vector<double> values_of(const at::Tensor& t) {
  std::vector<double> v(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm_act", [&] {
    const auto a = t.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = static_cast<double>(a[i]);
  });
  return v;
}

// A new (C,) tensor of `opts` holding v.
at::Tensor tensor_of(const std::vector<double>& v, const at::TensorOptions& opts) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm_act", [&] {
    scalar_t* d = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) d[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

template <typename T>
std::vector<T> narrowed(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// (scale, shift) of a = x * scale + shift in T, computed in double.
template <typename T>
std::pair<std::vector<T>, std::vector<T>> affine_of(const std::vector<double>& weight, const std::vector<double>& bias,
                                                    const std::vector<double>& mean,
                                                    const std::vector<double>& invstd) {
  std::vector<T> scale(weight.size()), shift(weight.size());
  for (size_t c = 0; c < weight.size(); ++c) {
    const auto a = bn_act::affine(weight[c], bias[c], mean[c], invstd[c]);
    scale[c] = static_cast<T>(a.scale);
    shift[c] = static_cast<T>(a.shift);
  }
  return {scale, shift};
}

std::vector<double> invstd_of(const std::vector<double>& var, double eps) {
  std::vector<double> out(var.size());
  for (size_t c = 0; c < var.size(); ++c) out[c] = 1.0 / std::sqrt(var[c] + eps);
  return out;
}

// v (C values) repeated tile times: the per-channel values of a kernel row of tile image rows.
template <typename T>
std::vector<T> tiled(const T* v, int64_t c, int64_t tile) {
  std::vector<T> out(c * tile);
  for (int64_t r = 0; r < tile; ++r) std::copy(v, v + c, out.begin() + r * c);
  return out;
}

// channels_last rows [first, first + rows) as kernel rows: f(first row, kernel rows, values a
// kernel row) for the whole tiles, then for the rest as one shorter kernel row.
template <typename F>
void for_kernel_rows(const Layout& l, int64_t first, int64_t rows, F f) {
  const int64_t full = rows / l.tile, rest = rows % l.tile;
  if (full) f(first, full, l.tile * l.c);
  if (rest) f(first + full * l.tile, int64_t{1}, rest * l.c);
}

// Part indices of channel c in merge order.
template <typename F>
void for_parts_of_channel(const Layout& l, int64_t c, F f) {
  if (l.cl) {
    for (int64_t q = 0; q < l.parts; ++q) f(q, q * l.c + c);
  } else {
    for (int64_t n = 0; n < l.n; ++n)
      for (int64_t k = 0; k < l.chunks; ++k) {
        const int64_t q = (n * l.c + c) * l.chunks + k;
        f(q, q);
      }
  }
}

// ---- Statistics (training pass 1) -----------------------------------------------------------

// Per-channel batch mean and biased variance, in double. Parts are combined by the parallel form
// of Chan's formula, in part order: mean = sum(n_i * mean_i) / n, M2 = sum(M2_i + n_i * (mean_i -
// mean)^2) (two sweeps over the parts, no division per part).
template <typename scalar_t>
void batch_stats(const at::Tensor& x, const Layout& l, double* mean, double* var) {
  using T = acc_t<scalar_t>;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  // Part q's mean / M2 of channel c at index q (NCHW) or q * C + c (channels_last).
  std::vector<T> pm(l.cl ? l.parts * l.c : l.parts), pq(pm.size());
  if (l.cl) {
    at::parallel_for(0, l.parts, 1, [&](int64_t begin, int64_t end) {
      // Lanes of a kernel row (channel c of tile row r at r * C + c): the whole tiles' lanes
      // (count `full` each), then the rest's (count 1 each), combined per channel as the parts are.
      const int64_t lanes = l.tile * l.c;
      std::vector<T> tile_mean(lanes), tile_m2(lanes), rest_mean(lanes), rest_m2(lanes);
      std::vector<double> sum(l.c), m2(l.c);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t first = q * l.chunk, cnt = l.part_count(q);
        const int64_t full = cnt / l.tile, rest = cnt % l.tile;
        if (l.tile == 1) {  // one lane a channel: the part's statistics as they are
          rows_mean_m2<scalar_t, T>(xd + first * l.c, cnt, l.c, pm.data() + q * l.c, pq.data() + q * l.c);
          continue;
        }
        if (full) rows_mean_m2<scalar_t, T>(xd + first * l.c, full, lanes, tile_mean.data(), tile_m2.data());
        if (rest) {
          rows_mean_m2<scalar_t, T>(xd + (first + full * l.tile) * l.c, 1, rest * l.c, rest_mean.data(),
                                    rest_m2.data());
        }
        std::fill(sum.begin(), sum.end(), 0.0);
        std::fill(m2.begin(), m2.end(), 0.0);
        for (int64_t j = 0; j < (full ? lanes : 0); ++j) sum[j % l.c] += static_cast<double>(full) * tile_mean[j];
        for (int64_t j = 0; j < rest * l.c; ++j) sum[j % l.c] += rest_mean[j];
        for (int64_t c = 0; c < l.c; ++c) sum[c] /= static_cast<double>(cnt);  // the part's mean
        for (int64_t j = 0; j < (full ? lanes : 0); ++j) {
          const double d = tile_mean[j] - sum[j % l.c];
          m2[j % l.c] += tile_m2[j] + static_cast<double>(full) * d * d;
        }
        for (int64_t j = 0; j < rest * l.c; ++j) {
          const double d = rest_mean[j] - sum[j % l.c];
          m2[j % l.c] += d * d;
        }
        for (int64_t c = 0; c < l.c; ++c) {
          pm[q * l.c + c] = static_cast<T>(sum[c]);
          pq[q * l.c + c] = static_cast<T>(m2[c]);
        }
      }
    });
  } else {
    at::parallel_for(0, l.parts, grain(std::min(l.hw, l.chunk)), [&](int64_t begin, int64_t end) {
      runs_mean_m2<scalar_t, T>(xd, l.plane_runs(), begin, end, pm.data(), pq.data());
    });
  }
  const double count = static_cast<double>(l.positions());
  at::parallel_for(0, l.c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0, m2 = 0;
      for_parts_of_channel(l, c, [&](int64_t q, int64_t i) { sum += static_cast<double>(l.part_count(q)) * pm[i]; });
      const double mu = sum / count;
      for_parts_of_channel(l, c, [&](int64_t q, int64_t i) {
        const double d = pm[i] - mu;
        m2 += pq[i] + static_cast<double>(l.part_count(q)) * d * d;
      });
      mean[c] = mu;
      var[c] = m2 / count;
    }
  });
}

// ---- y = act(x * scale + shift) + residual ---------------------------------------------------

template <typename scalar_t, typename T>
void apply(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const Layout& l, const T* scale,
           const T* shift, bool relu6, at::Tensor& y) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* rd = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  auto run = [&](auto relu6_tag) {
    constexpr bool kRelu6 = decltype(relu6_tag)::value;
    if (l.cl) {
      const std::vector<T> scale_t = tiled(scale, l.c, l.tile), shift_t = tiled(shift, l.c, l.tile);
      at::parallel_for(0, l.positions(), grain(l.c), [&](int64_t begin, int64_t end) {
        for_kernel_rows(l, begin, end - begin, [&](int64_t first, int64_t rows, int64_t len) {
          const int64_t off = first * l.c;
          rows_apply<kRelu6, scalar_t, T>(xd + off, rd ? rd + off : nullptr, rows, len, scale_t.data(),
                                          shift_t.data(), yd + off);
        });
      });
    } else {
      at::parallel_for(0, l.n * l.c, grain(l.hw), [&](int64_t begin, int64_t end) {
        planes_apply<kRelu6, scalar_t, T>(xd, rd, l.hw, l.c, begin, end, scale, shift, yd);
      });
    }
  };
  if (relu6) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

#define FERCUDA_DISPATCH_BN_ACT(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

at::Tensor empty_like_layout(const at::Tensor& x, bool cl) {
  return at::empty(x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous));
}

// ---- Ops ---------------------------------------------------------------------------------------

at::Tensor batch_norm_act_cpu(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& running_mean, const at::Tensor& running_var,
                              const c10::optional<at::Tensor>& residual_in, bool relu6, double eps) {
  const char* op = "batch_norm_act";
  check_bn_act_args(op, x_in, weight, bias, running_mean, running_var, residual_in, /*allow_double=*/true);
  check_dwconv_eps(op, eps);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  at::Tensor y = empty_like_layout(x, cl);
  if (y.numel() == 0) return y;
  c10::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = as_layout(*residual_in, cl);
  const Layout l = layout_of(x, cl);
  FERCUDA_DISPATCH_BN_ACT(x.scalar_type(), "batch_norm_act", [&] {
    using T = acc_t<scalar_t>;
    auto [scale, shift] = affine_of<T>(values_of(weight), values_of(bias), values_of(running_mean),
                                       invstd_of(values_of(running_var), eps));
    apply<scalar_t, T>(x, residual, l, scale.data(), shift.data(), relu6, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const c10::optional<at::Tensor>& residual_in, bool relu6, double eps,
    double momentum) {
  const char* op = "batch_norm_act_train";
  check_bn_act_args(op, x_in, weight, bias, running_mean, running_var, residual_in, /*allow_double=*/true);
  check_dwconv_eps(op, eps);
  check_dwconv_momentum(op, momentum);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  at::Tensor y = empty_like_layout(x, cl);
  const int64_t channels = x.size(1);
  // float32 statistics, or float64 for float64 x (as native batch_norm saves them).
  const auto stats_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (y.numel() == 0) {
    // nn.BatchNorm2d leaves the running statistics alone on an empty batch.
    return {y, at::zeros({channels}, stats_opts), at::ones({channels}, stats_opts), running_mean.clone(),
            running_var.clone()};
  }
  check_bn_act_batch_stats(op, x.size(0), channels, x.size(2), x.size(3));
  c10::optional<at::Tensor> residual;
  if (residual_in.has_value()) residual = as_layout(*residual_in, cl);
  const Layout l = layout_of(x, cl);
  std::vector<double> batch_mean(channels), batch_var(channels);  // biased variance
  FERCUDA_DISPATCH_BN_ACT(x.scalar_type(), "batch_norm_act", [&] {
    using T = acc_t<scalar_t>;
    batch_stats<scalar_t>(x, l, batch_mean.data(), batch_var.data());
    auto [scale, shift] = affine_of<T>(values_of(weight), values_of(bias), batch_mean, invstd_of(batch_var, eps));
    apply<scalar_t, T>(x, residual, l, scale.data(), shift.data(), relu6, y);
  });
  // nn.BatchNorm2d: the running variance takes the unbiased estimate.
  const double count = static_cast<double>(l.positions());
  const double unbias = count / (count - 1.0);
  std::vector<double> new_mean = values_of(running_mean), new_var = values_of(running_var);
  for (int64_t c = 0; c < channels; ++c) {
    new_mean[c] = new_mean[c] * (1.0 - momentum) + batch_mean[c] * momentum;
    new_var[c] = new_var[c] * (1.0 - momentum) + batch_var[c] * (unbias * momentum);
  }
  return {y, tensor_of(batch_mean, stats_opts), tensor_of(invstd_of(batch_var, eps), stats_opts),
          tensor_of(new_mean, running_mean.options()), tensor_of(new_var, running_var.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu6, bool training) {
  const char* op = "batch_norm_act_backward";
  check_bn_act_args(op, x_in, weight, bias, mean, invstd, c10::nullopt, /*allow_double=*/true, "mean", "invstd");
  check_bn_act_grad_out(op, grad_out_in, x_in);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  const int64_t channels = x.size(1);
  at::Tensor grad_x = empty_like_layout(x, cl);
  if (x.numel() == 0) {
    return {grad_x, at::zeros({channels}, weight.options()), at::zeros({channels}, bias.options())};
  }
  const at::Tensor g = as_layout(grad_out_in, cl);
  const Layout l = layout_of(x, cl);
  std::vector<double> sums(2 * channels);  // sum(ga), then sum(ga * xhat)
  const std::vector<double> mean_v = values_of(mean), invstd_v = values_of(invstd), weight_v = values_of(weight);
  FERCUDA_DISPATCH_BN_ACT(x.scalar_type(), "batch_norm_act", [&] {
    using T = acc_t<scalar_t>;
    const std::vector<T> mean_t = narrowed<T>(mean_v), invstd_t = narrowed<T>(invstd_v);
    auto [scale_t, shift_t] = affine_of<T>(weight_v, values_of(bias), mean_v, invstd_v);
    const T *mu = mean_t.data(), *is = invstd_t.data(), *scale = scale_t.data(), *shift = shift_t.data();
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const scalar_t* gd = g.const_data_ptr<scalar_t>();
    scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
    auto run = [&](auto relu6_tag) {
      constexpr bool kRelu6 = decltype(relu6_tag)::value;
      // Pass 1: the parts' sums, merged per channel in part order.
      std::vector<T> pg(l.cl ? l.parts * l.c : l.parts), pgx(pg.size());
      if (l.cl) {
        const std::vector<T> mu_t = tiled(mu, l.c, l.tile), is_t = tiled(is, l.c, l.tile),
                             scale_t = tiled(scale, l.c, l.tile), shift_t = tiled(shift, l.c, l.tile);
        at::parallel_for(0, l.parts, 1, [&](int64_t begin, int64_t end) {
          // Lanes of a kernel row, added into the part's per-channel sums tile row by tile row.
          std::vector<T> lane_g(l.tile * l.c), lane_gx(l.tile * l.c);
          for (int64_t q = begin; q < end; ++q) {
            T* const part_g = pg.data() + q * l.c;
            T* const part_gx = pgx.data() + q * l.c;
            std::fill(part_g, part_g + l.c, T(0));
            std::fill(part_gx, part_gx + l.c, T(0));
            for_kernel_rows(l, q * l.chunk, l.part_count(q), [&](int64_t first, int64_t rows, int64_t len) {
              const int64_t off = first * l.c;
              rows_grad_sums<kRelu6, scalar_t, T>(gd + off, xd + off, rows, len, mu_t.data(), is_t.data(),
                                                  scale_t.data(), shift_t.data(), lane_g.data(), lane_gx.data());
              for (int64_t j = 0; j < len; ++j) {
                part_g[j % l.c] += lane_g[j];
                part_gx[j % l.c] += lane_gx[j];
              }
            });
          }
        });
      } else {
        at::parallel_for(0, l.parts, grain(std::min(l.hw, l.chunk)), [&](int64_t begin, int64_t end) {
          runs_grad_sums<kRelu6, scalar_t, T>(gd, xd, l.plane_runs(), begin, end, mu, is, scale, shift, pg.data(),
                                              pgx.data());
        });
      }
      double* sd = sums.data();
      at::parallel_for(0, l.c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          double s_g = 0, s_gx = 0;
          for_parts_of_channel(l, c, [&](int64_t, int64_t i) {
            s_g += pg[i];
            s_gx += pgx[i];
          });
          sd[c] = s_g;
          sd[channels + c] = s_gx;
        }
      });
      // Pass 2: grad_x.
      const double count = static_cast<double>(l.positions());
      std::vector<bn_act::Backward<T>> k(l.c);
      for (int64_t c = 0; c < l.c; ++c)
        k[c] = bn_act::backward_coeffs(static_cast<T>(weight_v[c]), is[c], sd[c], sd[channels + c], count, training);
      if (l.cl) {
        std::vector<T> k_ga(l.c), k_xhat(l.c), k_one(l.c);
        for (int64_t c = 0; c < l.c; ++c) k_ga[c] = k[c].k_ga, k_xhat[c] = k[c].k_xhat, k_one[c] = k[c].k_one;
        const std::vector<T> mu_t = tiled(mu, l.c, l.tile), is_t = tiled(is, l.c, l.tile),
                             scale_t = tiled(scale, l.c, l.tile), shift_t = tiled(shift, l.c, l.tile),
                             k_ga_t = tiled(k_ga.data(), l.c, l.tile), k_xhat_t = tiled(k_xhat.data(), l.c, l.tile),
                             k_one_t = tiled(k_one.data(), l.c, l.tile);
        at::parallel_for(0, l.positions(), grain(l.c), [&](int64_t begin, int64_t end) {
          for_kernel_rows(l, begin, end - begin, [&](int64_t first, int64_t rows, int64_t len) {
            const int64_t off = first * l.c;
            rows_grad_x<kRelu6, scalar_t, T>(gd + off, xd + off, rows, len, mu_t.data(), is_t.data(), scale_t.data(),
                                             shift_t.data(), k_ga_t.data(), k_xhat_t.data(), k_one_t.data(),
                                             gxd + off);
          });
        });
      } else {
        at::parallel_for(0, l.n * l.c, grain(l.hw), [&](int64_t begin, int64_t end) {
          planes_grad_x<kRelu6, scalar_t, T>(gd, xd, l.hw, l.c, begin, end, mu, is, scale, shift, k.data(), gxd);
        });
      }
    };
    if (relu6) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  const std::vector<double> sum_ga(sums.begin(), sums.begin() + channels), sum_ga_xhat(sums.begin() + channels, sums.end());
  return {grad_x, tensor_of(sum_ga_xhat, weight.options()), tensor_of(sum_ga, bias.options())};
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CPU, m) {
  m.impl("batch_norm_act", &fercuda::batch_norm_act_cpu);
  m.impl("batch_norm_act_train", &fercuda::batch_norm_act_train_cpu);
  m.impl("batch_norm_act_backward", &fercuda::batch_norm_act_backward_cpu);
}

// The CPU ops of BatchNorm + ReLU6 (or identity) + residual add (schemas in csrc/ops.cpp): argument
// checks, allocation, the per-channel coefficients, the merges of the reductions' parts and the
// running statistics, around the compute of the active instruction-set path (bn_act_cpu_paths.h):
// the parallel loops in bn_act_cpu_compute.h, the loops themselves in bn_act_cpu_kernels.h, compiled
// once per path (bn_act_cpu_path_*.cpp).
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
// in part order (Chan's combination for the variance). The merges are here, compiled for the
// baseline, so that every path merges alike.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "bn_act_cpu_paths.h"
#include "fercuda/bn_act_math.h"
#include "fercuda/checks.h"

namespace fercuda {
namespace bn_act_cpu {

const Path& active_path() {
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512Bf16:
      return path_avx512_bf16();
    case cpu::Isa::kAvx512:
      return path_avx512();
    case cpu::Isa::kAvx2:
      return path_avx2();
    case cpu::Isa::kBaseline:
      break;
  }
  return path_baseline();
}

template <typename T>
void merge_tile_lanes(const Layout& l, int64_t full, int64_t rest, const T* tile_mean, const T* tile_m2,
                      const T* rest_mean, T* part_mean, T* part_m2, double* sum, double* m2) {
  const int64_t cnt = full * l.tile + rest;
  std::fill(sum, sum + l.c, 0.0);
  std::fill(m2, m2 + l.c, 0.0);
  // Lane j = r * C + c: tile row by tile row, each channel's lanes in lane order.
  const int64_t tile_rows = full ? l.tile : 0;
  for (int64_t r = 0; r < tile_rows; ++r)
    for (int64_t c = 0; c < l.c; ++c) sum[c] += static_cast<double>(full) * tile_mean[r * l.c + c];
  for (int64_t r = 0; r < rest; ++r)
    for (int64_t c = 0; c < l.c; ++c) sum[c] += rest_mean[r * l.c + c];
  for (int64_t c = 0; c < l.c; ++c) sum[c] /= static_cast<double>(cnt);  // the part's mean
  for (int64_t r = 0; r < tile_rows; ++r)
    for (int64_t c = 0; c < l.c; ++c) {
      const double d = tile_mean[r * l.c + c] - sum[c];
      m2[c] += tile_m2[r * l.c + c] + static_cast<double>(full) * d * d;
    }
  for (int64_t r = 0; r < rest; ++r)
    for (int64_t c = 0; c < l.c; ++c) {
      const double d = rest_mean[r * l.c + c] - sum[c];
      m2[c] += d * d;
    }
  for (int64_t c = 0; c < l.c; ++c) {
    part_mean[c] = static_cast<T>(sum[c]);
    part_m2[c] = static_cast<T>(m2[c]);
  }
}

template void merge_tile_lanes<float>(const Layout&, int64_t, int64_t, const float*, const float*, const float*,
                                      float*, float*, double*, double*);
template void merge_tile_lanes<double>(const Layout&, int64_t, int64_t, const double*, const double*,
                                       const double*, double*, double*, double*, double*);

}  // namespace bn_act_cpu

namespace {

using namespace bn_act_cpu;

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

// The parts of channels [begin, end) in merge order: f(c - begin, values of c in the part, slot)
// for each part, each channel's parts in part order. The slots are visited in memory order (the
// channels of a part, side by side), not channel by channel (a stride of C slots).
template <typename F>
void for_parts_of_channels(const Layout& l, int64_t begin, int64_t end, F f) {
  if (l.cl) {
    for (int64_t q = 0; q < l.parts; ++q) {
      const int64_t count = l.part_count(q);
      for (int64_t c = begin; c < end; ++c) f(c - begin, count, q * l.c + c);
    }
  } else {
    for (int64_t n = 0; n < l.n; ++n)
      for (int64_t c = begin; c < end; ++c)
        for (int64_t k = 0; k < l.chunks; ++k) {
          const int64_t q = (n * l.c + c) * l.chunks + k;
          f(c - begin, std::min(l.chunk, l.hw - k * l.chunk), q);
        }
  }
}

// Uninitialized storage for the parts' results (the path writes every slot).
template <typename T>
std::unique_ptr<T[]> part_slots(const Layout& l) {
  return std::unique_ptr<T[]>(new T[l.part_slots()]);
}

// Channels a task of the merges takes.
constexpr int64_t kMergeChannels = 64;

// ---- Statistics (training pass 1) -----------------------------------------------------------

// Per-channel batch mean and biased variance, in double: the path's parts (each part's mean and
// M2), combined by the parallel form of Chan's formula, in part order: mean = sum(n_i * mean_i) / n,
// M2 = sum(M2_i + n_i * (mean_i - mean)^2) (two sweeps over the parts, no division per part).
template <typename T>
void batch_stats(const Path& path, const at::Tensor& x, const Layout& l, double* mean, double* var) {
  const auto pm = part_slots<T>(l), pq = part_slots<T>(l);
  path.kernels<T>().part_stats(x, l, pm.get(), pq.get());
  const double count = static_cast<double>(l.positions());
  at::parallel_for(0, l.c, kMergeChannels, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(end - begin), m2(end - begin);
    for_parts_of_channels(l, begin, end, [&](int64_t j, int64_t n_i, int64_t i) {
      sum[j] += static_cast<double>(n_i) * pm[i];
    });
    for (int64_t c = begin; c < end; ++c) mean[c] = sum[c - begin] / count;
    for_parts_of_channels(l, begin, end, [&](int64_t j, int64_t n_i, int64_t i) {
      const double d = pm[i] - mean[begin + j];
      m2[j] += pq[i] + static_cast<double>(n_i) * d * d;
    });
    for (int64_t c = begin; c < end; ++c) var[c] = m2[c - begin] / count;
  });
}

// float for float32, float16 and bfloat16 x; double for float64.
template <typename F>
void with_acc_type(const at::Tensor& x, F fn) {
  if (x.scalar_type() == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

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
  const at::Tensor residual = residual_in.has_value() ? as_layout(*residual_in, cl) : at::Tensor();
  const Layout l = layout_of(x, cl);
  with_acc_type(x, [&](auto acc) {
    using T = decltype(acc);
    auto [scale, shift] = affine_of<T>(values_of(weight), values_of(bias), values_of(running_mean),
                                       invstd_of(values_of(running_var), eps));
    const Coeffs<T> k{nullptr, nullptr, scale.data(), shift.data(), nullptr, nullptr, nullptr};
    active_path().kernels<T>().apply(x, residual, l, k, relu6, y);
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
  const at::Tensor residual = residual_in.has_value() ? as_layout(*residual_in, cl) : at::Tensor();
  const Layout l = layout_of(x, cl);
  const Path& path = active_path();
  std::vector<double> batch_mean(channels), batch_var(channels);  // biased variance
  with_acc_type(x, [&](auto acc) {
    using T = decltype(acc);
    batch_stats<T>(path, x, l, batch_mean.data(), batch_var.data());
    auto [scale, shift] = affine_of<T>(values_of(weight), values_of(bias), batch_mean, invstd_of(batch_var, eps));
    const Coeffs<T> k{nullptr, nullptr, scale.data(), shift.data(), nullptr, nullptr, nullptr};
    path.kernels<T>().apply(x, residual, l, k, relu6, y);
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
  const Path& path = active_path();
  std::vector<double> sums(2 * channels);  // sum(ga), then sum(ga * xhat)
  const std::vector<double> mean_v = values_of(mean), invstd_v = values_of(invstd), weight_v = values_of(weight);
  with_acc_type(x, [&](auto acc) {
    using T = decltype(acc);
    const Kernels<T>& kernels = path.kernels<T>();
    const std::vector<T> mean_t = narrowed<T>(mean_v), invstd_t = narrowed<T>(invstd_v);
    auto [scale_t, shift_t] = affine_of<T>(weight_v, values_of(bias), mean_v, invstd_v);
    Coeffs<T> k{mean_t.data(), invstd_t.data(), scale_t.data(), shift_t.data(), nullptr, nullptr, nullptr};
    // Pass 1: the parts' sums, merged per channel in part order.
    const auto pg = part_slots<T>(l), pgx = part_slots<T>(l);
    kernels.part_grad_sums(g, x, l, k, relu6, pg.get(), pgx.get());
    double* sd = sums.data();
    at::parallel_for(0, l.c, kMergeChannels, [&](int64_t begin, int64_t end) {
      for_parts_of_channels(l, begin, end, [&](int64_t j, int64_t, int64_t i) {
        sd[begin + j] += pg[i];
        sd[channels + begin + j] += pgx[i];
      });
    });
    // Pass 2: grad_x.
    const double count = static_cast<double>(l.positions());
    std::vector<T> k_ga(l.c), k_xhat(l.c), k_one(l.c);
    for (int64_t c = 0; c < l.c; ++c) {
      const auto b = bn_act::backward_coeffs(static_cast<T>(weight_v[c]), invstd_t[c], sd[c], sd[channels + c], count,
                                             training);
      k_ga[c] = b.k_ga, k_xhat[c] = b.k_xhat, k_one[c] = b.k_one;
    }
    k.k_ga = k_ga.data(), k.k_xhat = k_xhat.data(), k.k_one = k_one.data();
    kernels.grad_x(g, x, l, k, relu6, grad_x);
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

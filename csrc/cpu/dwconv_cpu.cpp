// The CPU ops of the fused depthwise 3x3 conv + BatchNorm + ReLU6 (schemas in csrc/ops.cpp):
// argument checks, allocation, BatchNorm folding and the running statistics, around the
// compute of the active instruction-set path (dwconv_cpu_paths.h): the kernels are in
// dwconv_cpu_kernels.h and dwconv_cpu_vec.h (portable vector code, compiled once per path),
// the tasks and their merges in dwconv_cpu_compute.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "dwconv_cpu_paths.h"
#include "fercuda/checks.h"
#include "fercuda/dwconv_math.h"

namespace fercuda {
namespace dwconv_cpu {

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

}  // namespace dwconv_cpu

namespace {

using namespace dwconv_cpu;

using dwconv::kTaps;

// ---- Arguments: layout, geometry, per-channel parameters --------------------------------

at::Tensor as_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

Geometry geometry(const at::Tensor& x, const std::array<int64_t, 4>& out, int64_t stride, int64_t padding) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), out[2], out[3], stride, padding};
}

at::Tensor empty_output(const at::Tensor& x, const std::array<int64_t, 4>& out, bool channels_last,
                        c10::optional<at::ScalarType> dtype = c10::nullopt) {
  return at::empty({out[0], out[1], out[2], out[3]},
                   x.options()
                       .dtype(dtype.value_or(x.scalar_type()))
                       .memory_format(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

template <typename T>
at::Tensor widen(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<T>::value).contiguous();
}

// Per-channel parameters widened to the accumulation type, in one place.
template <typename T>
ChannelParams channel_params(const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias, int64_t channels) {
  ChannelParams p;
  p.w = widen<T>(weight).reshape({channels, kTaps});
  p.b = bias.has_value() ? widen<T>(*bias)
                         : at::zeros({channels}, weight.options().dtype(c10::CppTypeToScalarType<T>::value));
  p.bn_w = widen<T>(bn_weight);
  p.bn_b = widen<T>(bn_bias);
  return p;
}

// Folded weights and shift for mean / invstd: (C, 9) and (C,) in T.
template <typename T>
std::pair<at::Tensor, at::Tensor> fold(const ChannelParams& p, const at::Tensor& mean, const at::Tensor& invstd,
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
    auto [wf, shift] = fold<T>(p, mean, invstd, g.c);
    active_path().affine_relu6(x, wf, shift, g, cl, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_train_cpu(
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
  // save_z: the conv output in the accumulation type (the dtype of the statistics), kept for the
  // backward, which reads it (channels_last float32 and bfloat16), where it is small enough to
  // stay in cache; else empty (the backward computes it).
  const bool keep_z = cl && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                      y.numel() <= kKeepZValues;
  at::Tensor z = keep_z ? empty_output(x, out, cl, stats_dtype) : at::empty({0}, stats_opts);
  if (y.numel() == 0) {
    // nn.BatchNorm2d leaves the running statistics alone on an empty batch.
    return {y, at::zeros({channels}, stats_opts), at::ones({channels}, stats_opts), running_mean.clone(),
            running_var.clone(), z};
  }
  check_dwconv_batch_stats(op, out[0], out[1], out[2], out[3]);
  const Geometry g = geometry(x, out, stride, padding);
  const int64_t count = g.n * g.h_out * g.w_out;
  at::Tensor batch_mean = at::empty({channels}, x.options().dtype(at::kDouble));
  at::Tensor batch_var = at::empty({channels}, x.options().dtype(at::kDouble));  // biased
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_train", [&] {
    using T = acc_type_t<scalar_t>;
    const auto p = channel_params<T>(weight, bias, bn_weight, bn_bias, g.c);
    double* mean_d = batch_mean.mutable_data_ptr<double>();
    double* var_d = batch_var.mutable_data_ptr<double>();
    const Path& path = active_path();
    // Pass 1: conv -> z, and per-part mean / M2 (parts of equal size), then Chan's combination.
    at::Tensor z_keep = z.numel() > 0 ? z : at::Tensor();
    const bool from_z = path.batch_stats(x, p, g, cl, mean_d, var_d, z_keep, y);
    const at::Tensor mean_t = batch_mean.to(c10::CppTypeToScalarType<T>::value);
    const at::Tensor invstd_t = at::rsqrt(batch_var + eps).to(c10::CppTypeToScalarType<T>::value);
    if (from_z) {
      // Pass 2 from z: y = relu6((z - mean) * invstd * bn_w + bn_b).
      const at::Tensor scale = p.bn_w * invstd_t;
      const at::Tensor shift = p.bn_b - mean_t * scale;
      path.normalize_relu6(z_keep.defined() ? z_keep : y, y, scale, shift, g);
    } else {
      // Pass 2: recompute the conv, normalize with the batch statistics, ReLU6, write y.
      auto [wf, shift] = fold<T>(p, mean_t, invstd_t, g.c);
      path.affine_relu6(x, wf, shift, g, cl, y);
    }
  });
  // nn.BatchNorm2d: the running variance takes the unbiased estimate.
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  at::Tensor new_mean = (running_mean.to(at::kDouble) * (1.0 - momentum) + batch_mean * momentum)
                            .to(running_mean.scalar_type());
  at::Tensor new_var = (running_var.to(at::kDouble) * (1.0 - momentum) + batch_var * (unbias * momentum))
                           .to(running_var.scalar_type());
  return {y, batch_mean.to(stats_dtype), at::rsqrt(batch_var + eps).to(stats_dtype), new_mean, new_var, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& mean, const at::Tensor& invstd, int64_t stride, int64_t padding, bool training,
    const c10::optional<at::Tensor>& z_in) {
  const char* op = "dwconv_bn_relu6_backward";
  const auto out = check_dwconv_args(op, x_in, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding,
                                     "mean", "invstd", /*allow_double=*/true);
  check_dwconv_grad_out(op, grad_out_in, x_in, out);
  check_dwconv_saved_z(op, z_in, x_in, out);
  const bool cl = dwconv_channels_last(x_in);
  const at::Tensor x = as_layout(x_in, cl);
  const at::Tensor grad_out = as_layout(grad_out_in, cl);
  const at::Tensor z = z_in.has_value() && z_in->defined() && z_in->numel() > 0 ? as_layout(*z_in, cl) : at::Tensor();
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
  at::Tensor sums = at::empty({channels, kSlots}, x.options().dtype(at::kDouble));
  FERCUDA_DISPATCH_DWCONV(x.scalar_type(), "dwconv_bn_relu6_backward", [&] {
    using T = acc_type_t<scalar_t>;
    const auto p = channel_params<T>(weight, bias, bn_weight, bn_bias, g.c);
    const at::Tensor mean_t = widen<T>(mean), invstd_t = widen<T>(invstd);
    active_path().backward(x, z, grad_out, p, mean_t, invstd_t, g, cl, training, count, grad_x,
                           sums.mutable_data_ptr<double>());
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

// Input validation shared by every kernel file (CPU and CUDA). Each error names the
// operator, the argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <string>

#include "fercuda/dwconv_math.h"

namespace fercuda {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + (t.dim() == 1 ? ",)" : ")");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* arg) {
  TORCH_CHECK(t.scalar_type() == expected, "fercuda.", op, ": argument '", arg, "' must be a ",
              c10::toString(expected), " tensor, got ", c10::toString(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& a, const char* arg_a, const at::Tensor& b, const char* arg_b,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), "fercuda.", op, ": arguments '", arg_a, "' and '", arg_b,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

// An image argument of shape (H, W), (N, H, W) or (N, 1, H, W), returned as a contiguous
// (N, H, W) tensor (a view where the input already is contiguous).
inline at::Tensor as_image_batch(const at::Tensor& img, at::ScalarType dtype, const char* op, const char* arg) {
  check_dtype(img, dtype, op, arg);
  const int64_t dim = img.dim();
  TORCH_CHECK(dim == 2 || dim == 3 || dim == 4, "fercuda.", op, ": argument '", arg,
              "' must have shape (H, W), (N, H, W) or (N, 1, H, W), got a ", dim, "-D tensor of shape ",
              shape_str(img));
  if (dim == 4) {
    TORCH_CHECK(img.size(1) == 1, "fercuda.", op, ": argument '", arg,
                "' must have one channel when 4-D, (N, 1, H, W), got shape ", shape_str(img),
                " (convert colour images to grayscale first)");
  }
  const int64_t h = img.size(dim - 2), w = img.size(dim - 1);
  const int64_t n = dim == 2 ? 1 : img.size(0);
  return img.reshape({n, h, w}).contiguous();
}

inline void check_same_shape(const at::Tensor& a, const char* arg_a, const at::Tensor& b, const char* arg_b,
                             const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), "fercuda.", op, ": arguments '", arg_a, "' and '", arg_b,
              "' must have the same shape, got ", shape_str(a), " and ", shape_str(b));
}

inline void check_gaussian_ksize(int64_t ksize, const char* op, bool allow_zero) {
  TORCH_CHECK(ksize == 3 || ksize == 5 || ksize == 7 || (allow_zero && ksize == 0), "fercuda.", op,
              ": argument 'ksize' must be ", allow_zero ? "0 (no blur), " : "", "3, 5 or 7, got ", ksize);
}

inline void check_threshold(double v, const char* op, const char* arg) {
  TORCH_CHECK(!std::isnan(v) && v >= 0.0, "fercuda.", op, ": argument '", arg,
              "' must be a number >= 0, got ", v);
}

inline void check_gradient_kind(const std::string& gradient, const char* op) {
  TORCH_CHECK(gradient == "sobel" || gradient == "paper", "fercuda.", op,
              ": argument 'gradient' must be \"sobel\" or \"paper\", got \"", gradient, "\"");
}

// ---- Fused depthwise 3x3 conv + BatchNorm + ReLU6 ------------------------------

// Float64 is accepted where the kernel supports it (the CPU kernels, for gradcheck).
inline bool is_floating_dwconv_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble);
}

// A per-channel (C,) argument: right shape, same device as x, and x's dtype, or float32
// when x is half precision (BatchNorm parameters under autocast stay float32).
inline void check_dwconv_channel_arg(const at::Tensor& t, const char* arg, const at::Tensor& x, int64_t channels,
                                     bool allow_float32, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fercuda.", op, ": argument '", arg,
              "' must have shape (C,) = (", channels, ",) for x of shape ", shape_str(x), ", got ", shape_str(t));
  check_same_device(x, "x", t, arg, op);
  const bool ok = t.scalar_type() == x.scalar_type() || (allow_float32 && t.scalar_type() == at::kFloat);
  TORCH_CHECK(ok, "fercuda.", op, ": argument '", arg, "' must be a ", c10::toString(x.scalar_type()),
              allow_float32 && x.scalar_type() != at::kFloat ? " or Float" : "", " tensor like x, got ",
              c10::toString(t.scalar_type()));
}

// Whether the fused block runs x, and lays out its outputs, in channels_last: x is
// channels_last-contiguous and not also NCHW-contiguous (a tensor that is both, such as C == 1
// or H == W == 1, runs as NCHW; one contiguous in neither is copied to NCHW). Every kernel, the
// fake kernels and the Triton ops follow this rule (fercuda._checks.dwconv_channels_last).
inline bool dwconv_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Validates the arguments every dwconv_bn_relu6 op shares and returns the output shape
// (N, C, H_out, W_out). `running_mean` / `running_var` are the mean / invstd of the backward.
inline std::array<int64_t, 4> check_dwconv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
                                                const at::Tensor& bn_bias, const at::Tensor& running_mean,
                                                const at::Tensor& running_var, int64_t stride, int64_t padding,
                                                const char* mean_arg = "running_mean",
                                                const char* var_arg = "running_var", bool allow_double = false) {
  TORCH_CHECK(x.dim() == 4, "fercuda.", op, ": argument 'x' must be a 4-D (N, C, H, W) tensor, got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(is_floating_dwconv_dtype(x.scalar_type(), allow_double), "fercuda.", op, ": argument 'x' must be a ",
              allow_double ? "Float, Double, Half or BFloat16" : "Float, Half or BFloat16", " tensor, got ",
              c10::toString(x.scalar_type()));
  const int64_t channels = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "fercuda.", op, ": argument 'weight' must have shape (C, 1, 3, 3) = (", channels,
              ", 1, 3, 3) for x of shape ", shape_str(x), ", got ", shape_str(weight));
  check_same_device(x, "x", weight, "weight", op);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fercuda.", op, ": argument 'weight' must be a ",
              c10::toString(x.scalar_type()), " tensor like x, got ", c10::toString(weight.scalar_type()));
  if (bias.has_value()) check_dwconv_channel_arg(*bias, "bias", x, channels, false, op);
  const bool half = x.scalar_type() != at::kFloat;
  check_dwconv_channel_arg(bn_weight, "bn_weight", x, channels, half, op);
  check_dwconv_channel_arg(bn_bias, "bn_bias", x, channels, half, op);
  check_dwconv_channel_arg(running_mean, mean_arg, x, channels, true, op);
  check_dwconv_channel_arg(running_var, var_arg, x, channels, true, op);
  TORCH_CHECK(stride == 1 || stride == 2, "fercuda.", op, ": argument 'stride' must be 1 or 2, got ", stride);
  TORCH_CHECK(padding >= 0, "fercuda.", op, ": argument 'padding' must be >= 0, got ", padding);
  const int64_t h_out = dwconv::out_size(x.size(2), stride, padding);
  const int64_t w_out = dwconv::out_size(x.size(3), stride, padding);
  TORCH_CHECK(x.size(2) + 2 * padding >= 3 && x.size(3) + 2 * padding >= 3, "fercuda.", op,
              ": the padded input must be at least 3x3 for a 3x3 kernel, got x of shape ", shape_str(x),
              " with padding ", padding);
  return {x.size(0), channels, h_out, w_out};
}

// BatchNorm's eps keeps 1 / sqrt(var + eps) finite where a channel's variance is 0 (a NaN, infinite,
// zero or negative one does not); a momentum outside [0, 1] extrapolates the running statistics
// instead of averaging them.
inline void check_dwconv_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, "fercuda.", op,
                    ": argument 'eps' must be a finite number > 0, got ", eps);
}

inline void check_dwconv_momentum(const char* op, double momentum) {
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "fercuda.", op,
                    ": argument 'momentum' must be a number in [0, 1], got ", momentum);
}

inline void check_dwconv_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                  const std::array<int64_t, 4>& out) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == out[0] && grad_out.size(1) == out[1] &&
                  grad_out.size(2) == out[2] && grad_out.size(3) == out[3],
              "fercuda.", op, ": argument 'grad_out' must have the output's shape (", out[0], ", ", out[1], ", ",
              out[2], ", ", out[3], "), got ", shape_str(grad_out));
  check_same_device(x, "x", grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "fercuda.", op, ": argument 'grad_out' must be a ",
              c10::toString(x.scalar_type()), " tensor like x, got ", c10::toString(grad_out.scalar_type()));
}

// The backward's z (the train op's save_z): None, an empty tensor, or the output's shape on x's
// device in the accumulation type (float32; float64 for float64 x).
inline void check_dwconv_saved_z(const char* op, const c10::optional<at::Tensor>& z, const at::Tensor& x,
                                 const std::array<int64_t, 4>& out) {
  if (!z.has_value() || !z->defined() || z->numel() == 0) return;
  TORCH_CHECK(z->dim() == 4 && z->size(0) == out[0] && z->size(1) == out[1] && z->size(2) == out[2] &&
                  z->size(3) == out[3],
              "fercuda.", op, ": argument 'z' must be empty or have the output's shape (", out[0], ", ", out[1], ", ",
              out[2], ", ", out[3], "), got ", shape_str(*z));
  check_same_device(x, "x", *z, "z", op);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(z->scalar_type() == acc, "fercuda.", op, ": argument 'z' must be a ", c10::toString(acc),
              " tensor (the conv output in the accumulation type), got ", c10::toString(z->scalar_type()));
}

// BatchNorm's batch statistics need two values per channel, as nn.BatchNorm2d demands.
inline void check_dwconv_batch_stats(const char* op, int64_t n, int64_t channels, int64_t h_out, int64_t w_out) {
  TORCH_CHECK(n * h_out * w_out > 1, "fercuda.", op,
              ": Expected more than 1 value per channel when training, got input size [", n, ", ", channels,
              ", ", h_out, ", ", w_out, "]");
}

// ---- BatchNorm + ReLU6 (or identity) + residual add --------------------------------------

// Validates the arguments every batch_norm_act op shares: x (N, C, H, W); weight, bias and the
// statistics (C,) like x (float32 allowed where x is half precision; the statistics may always be
// float32); a residual of x's shape, dtype and device. `mean_arg` / `var_arg` name the statistics
// (mean / invstd in the backward).
inline void check_bn_act_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& residual,
                              bool allow_double, const char* mean_arg = "running_mean",
                              const char* var_arg = "running_var") {
  TORCH_CHECK(x.dim() == 4, "fercuda.", op, ": argument 'x' must be a 4-D (N, C, H, W) tensor, got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(is_floating_dwconv_dtype(x.scalar_type(), allow_double), "fercuda.", op, ": argument 'x' must be a ",
              allow_double ? "Float, Double, Half or BFloat16" : "Float, Half or BFloat16", " tensor, got ",
              c10::toString(x.scalar_type()));
  const int64_t channels = x.size(1);
  const bool half = x.scalar_type() != at::kFloat;
  check_dwconv_channel_arg(weight, "weight", x, channels, half, op);
  check_dwconv_channel_arg(bias, "bias", x, channels, half, op);
  check_dwconv_channel_arg(mean, mean_arg, x, channels, true, op);
  check_dwconv_channel_arg(var, var_arg, x, channels, true, op);
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == x.sizes(), "fercuda.", op, ": argument 'residual' must have the shape of x ",
                shape_str(x), ", got ", shape_str(r));
    check_same_device(x, "x", r, "residual", op);
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "fercuda.", op, ": argument 'residual' must be a ",
                c10::toString(x.scalar_type()), " tensor like x, got ", c10::toString(r.scalar_type()));
  }
}

inline void check_bn_act_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "fercuda.", op, ": argument 'grad_out' must have the shape of x ",
              shape_str(x), ", got ", shape_str(grad_out));
  check_same_device(x, "x", grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "fercuda.", op, ": argument 'grad_out' must be a ",
              c10::toString(x.scalar_type()), " tensor like x, got ", c10::toString(grad_out.scalar_type()));
}

// BatchNorm's batch statistics need two values per channel: a ValueError, as nn.BatchNorm2d raises.
inline void check_bn_act_batch_stats(const char* op, int64_t n, int64_t channels, int64_t h, int64_t w) {
  TORCH_CHECK_VALUE(n * h * w > 1, "fercuda.", op, ": Expected more than 1 value per channel when training, got input size [",
                    n, ", ", channels, ", ", h, ", ", w, "]");
}

}  // namespace fercuda

// Input validation shared by every kernel file (CPU and CUDA). Each error names the
// operator, the argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

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

}  // namespace fercuda

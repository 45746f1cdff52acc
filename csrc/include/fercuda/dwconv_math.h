// Arithmetic of the fused depthwise 3x3 conv + BatchNorm + ReLU6, written once for the
// CPU and the CUDA kernels. T is the accumulation type: float for float32, float16 and
// bfloat16 tensors (widened on load, narrowed on store), double for float64 (gradcheck).
//
// Notation per channel c: z = conv(x, w) + b, xhat = (z - mean) * invstd,
// a = bn_w * xhat + bn_b, y = relu6(a). BatchNorm is folded into the convolution,
// y = relu6(conv(x, w * scale) + shift), so a forward pass reads x once and writes y once.
#pragma once

#include <cmath>
#include <cstdint>

#include "fercuda/hd.h"

namespace fercuda {
namespace dwconv {

constexpr int kTaps = 9;  // 3x3 kernel, row-major: tap = ky * 3 + kx

// Output extent of a 3x3 window with the given stride and zero padding (<= 0: no output).
FERCUDA_HD int64_t out_size(int64_t in, int64_t stride, int64_t padding) {
  return (in + 2 * padding - 3) / stride + 1;
}

// NaN propagates, as in torch.nn.functional.relu6. Written with comparisons (not fminf /
// fmaxf) so the CPU loops vectorize to min / max.
template <typename T>
FERCUDA_HD T relu6(T a) {
  return a < T(0) ? T(0) : (a > T(6) ? T(6) : a);
}

// ReLU6 passes the gradient strictly inside (0, 6), as torch's hardtanh_backward does.
template <typename T>
FERCUDA_HD bool relu6_passes(T a) {
  return a > T(0) && a < T(6);
}

template <typename T>
FERCUDA_HD T invstd_of(T var, T eps) {
  return T(1) / sqrt(var + eps);
}

// scale = bn_w * invstd multiplies the conv; shift = (b - mean) * scale + bn_b is added.
template <typename T>
struct BNFold {
  T scale;
  T shift;
};

template <typename T>
FERCUDA_HD BNFold<T> bn_fold(T bias, T bn_weight, T bn_bias, T mean, T invstd) {
  const T scale = bn_weight * invstd;
  return {scale, (bias - mean) * scale + bn_bias};
}

// Gradient of the pre-BatchNorm conv output z from the gradient g at y:
//  training: mean and invstd are batch statistics over count = N * H_out * W_out values,
//            gz = bn_w * invstd * (ga - sum_ga / count - xhat * sum_ga_xhat / count);
//  frozen:   mean and invstd are constants, gz = bn_w * invstd * ga;
// with ga = g where 0 < a < 6, else 0.
template <typename T>
struct BNBackward {
  T k_ga;    // bn_w * invstd
  T k_one;   // training: -k_ga * sum_ga / count, else 0
  T k_xhat;  // training: -k_ga * sum_ga_xhat / count, else 0
};

template <typename T>
FERCUDA_HD BNBackward<T> bn_backward_coeffs(T bn_weight, T invstd, double sum_ga, double sum_ga_xhat, double count,
                                            bool training) {
  const T k = bn_weight * invstd;
  if (!training) return {k, T(0), T(0)};
  return {k, static_cast<T>(-k * sum_ga / count), static_cast<T>(-k * sum_ga_xhat / count)};
}

template <typename T>
FERCUDA_HD T grad_z(const BNBackward<T>& c, T ga, T xhat) {
  return c.k_ga * ga + c.k_xhat * xhat + c.k_one;
}

}  // namespace dwconv
}  // namespace fercuda

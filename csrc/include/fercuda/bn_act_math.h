// Arithmetic of BatchNorm + ReLU6 (or identity) + residual add, written once for the CPU and the
// CUDA kernels. T is the accumulation type: float for float32, float16 and bfloat16 tensors
// (widened on load, narrowed on store), double for float64.
//
// Notation per channel c: xhat = (x - mean) * invstd, a = weight * xhat + bias = x * scale + shift,
// y = act(a) + residual, act = ReLU6 or the identity.
#pragma once

#include <cmath>

#include "fercuda/hd.h"

namespace fercuda {
namespace bn_act {

// NaN propagates, as in torch.nn.functional.relu6; written with comparisons so that the CPU
// loops vectorize to min / max.
template <typename T>
FERCUDA_HD T act(T a, bool relu6) {
  return relu6 ? (a < T(0) ? T(0) : (a > T(6) ? T(6) : a)) : a;
}

// ReLU6 passes the gradient strictly inside (0, 6), as torch's hardtanh_backward does.
template <typename T>
FERCUDA_HD bool act_passes(T a, bool relu6) {
  return !relu6 || (a > T(0) && a < T(6));
}

// a = x * scale + shift.
template <typename T>
struct Affine {
  T scale;
  T shift;
};

template <typename T>
FERCUDA_HD Affine<T> affine(T weight, T bias, T mean, T invstd) {
  const T scale = weight * invstd;
  return {scale, bias - mean * scale};
}

// Gradient of x from ga (the gradient at a: grad_out where the activation passes it, else 0):
//   training (batch statistics over count values):
//     gx = k * (ga - sum_ga / count - xhat * sum_ga_xhat / count),  k = weight * invstd;
//   frozen (running statistics, constants): gx = k * ga.
// As gx = k_ga * ga + k_xhat * xhat + k_one.
template <typename T>
struct Backward {
  T k_ga;
  T k_xhat;
  T k_one;
};

template <typename T>
FERCUDA_HD Backward<T> backward_coeffs(T weight, T invstd, double sum_ga, double sum_ga_xhat, double count,
                                       bool training) {
  const T k = weight * invstd;
  if (!training) return {k, T(0), T(0)};
  return {k, static_cast<T>(-k * sum_ga_xhat / count), static_cast<T>(-k * sum_ga / count)};
}

template <typename T>
FERCUDA_HD T grad_x(const Backward<T>& c, T ga, T xhat) {
  return c.k_ga * ga + c.k_xhat * xhat + c.k_one;
}

}  // namespace bn_act
}  // namespace fercuda

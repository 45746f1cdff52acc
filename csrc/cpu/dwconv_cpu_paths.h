// The fused depthwise conv + BatchNorm + ReLU6 on the CPU, split by instruction set: the op
// glue (dwconv_cpu.cpp: argument checks, allocation, BatchNorm folding, running statistics)
// calls the compute of one path, chosen at run time (cpu_isa.h). Each path is a translation
// unit of its own (dwconv_cpu_path_*.cpp) that compiles the same compute (dwconv_cpu_compute.h)
// for its instruction set, with the path's own kernels where it has them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"

namespace fercuda {
namespace dwconv_cpu {

// Floating types of x; half-precision ones accumulate in float.
#define FERCUDA_DISPATCH_DWCONV(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Geometry {
  int64_t n, c, h, w, h_out, w_out, stride, padding;
  int64_t hp() const { return h + 2 * padding; }
  int64_t wp() const { return w + 2 * padding; }
};

// Per-channel parameters in the accumulation type: w (C, 9), b, bn_w, bn_b (C,).
struct ChannelParams {
  at::Tensor w, b, bn_w, bn_b;
};

// The largest conv output (values; 8 MiB of float32) that the training op keeps for the
// backward (save_z), and that the backward keeps between its passes where it was not kept:
// the network's 6x6 and 12x12 planes, which stay in cache.
constexpr int64_t kKeepZValues = int64_t(2) << 20;

// Slots of the backward's per-channel sums: sum ga, sum ga * xhat, sum gz, then the 9 taps
// of grad_weight.
constexpr int kSlots = 3 + 9;

// The compute of one path. Tensors of the accumulation type where not said otherwise; x,
// grad_out, y and grad_x in the layout named by channels_last, contiguous in it.
struct Path {
  // y = relu6(conv(x, wf) + shift): inference, and training's second pass. wf (C, 9), shift (C,).
  void (*affine_relu6)(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& shift, const Geometry& g,
                       bool channels_last, at::Tensor& y);
  // The batch mean and biased variance (C,) of z = conv(x, p.w) + p.b. Where z_keep is defined
  // (the op keeps z for the backward: out's shape in the accumulation type, in the layout named
  // by channels_last) z is written there. Returns true where the op is to normalize with
  // normalize_relu6, from z_keep, or from y where z_keep is undefined and the path wrote z, in
  // y's dtype, into y; false where it computes the conv again for y (affine_relu6).
  bool (*batch_stats)(const at::Tensor& x, const ChannelParams& p, const Geometry& g, bool channels_last,
                      double* mean, double* var, at::Tensor& z_keep, at::Tensor& y);
  // y = relu6(src * scale + shift), scale and shift (C,) in float, channels_last; src is z_keep
  // (float) or y itself. Only called where batch_stats returned true.
  void (*normalize_relu6)(const at::Tensor& src, at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                          const Geometry& g);
  // grad_x, and sums (C, kSlots) of the BatchNorm and conv parameter gradients; mean and invstd
  // (C,) are the batch statistics (training) or the running ones. z: the kept conv output, which
  // a path may read instead of computing the conv again, or undefined.
  void (*backward)(const at::Tensor& x, const at::Tensor& z, const at::Tensor& grad_out, const ChannelParams& p,
                   const at::Tensor& mean, const at::Tensor& invstd, const Geometry& g, bool channels_last,
                   bool training, double count, at::Tensor& grad_x, double* sums);
};

const Path& path_baseline();
const Path& path_avx2();
const Path& path_avx512();
const Path& path_avx512_bf16();

// The path of the active instruction set (cpu::active_isa()).
const Path& active_path();

}  // namespace dwconv_cpu
}  // namespace fercuda

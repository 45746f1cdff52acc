// Device code of the fused depthwise 3x3 conv + BatchNorm + ReLU6 CUDA kernels, and the host-side
// plan of every launch (grid, block, shared memory, scratch sizes, index width); dwconv_cuda.cu
// holds the op glue. Kept apart so that tests/test_dwconv.py (its "emulated" cases) can compile it for the
// CPU against an emulation of the CUDA built-ins (tests/cuda_emulation.h), launch it as the op
// does, and compare it with float64 PyTorch on a machine without a GPU.
//
// Passes over memory (each pass reads x, and grad_out where needed, once):
//   inference          1 pass : conv -> folded BatchNorm -> ReLU6 -> y.
//   training forward   2 passes: (1) conv -> per-channel partial statistics, nothing stored;
//                                (2) recompute conv -> normalize -> ReLU6 -> y.
//                      Normalizing needs the statistics of the whole batch, so y cannot be
//                      written in pass 1; recomputing the 9-tap conv is cheaper than storing it.
//   backward           3 passes: (1) recompute conv, ReLU6 mask -> per-channel sum(g), sum(g*xhat);
//                                (2) recompute conv -> grad of the conv output (gz, stored as float32)
//                                    + grad_weight / grad_bias partial reductions;
//                                (3) grad_x as the transposed depthwise conv of gz.
//                      gz needs the sums of pass 1 (training), and every grad_x element needs gz
//                      at up to 9 output positions, each of which would cost a 9-tap recompute:
//                      storing gz once is cheaper than recomputing it 9 times.
// The one-pass kernels (inference, training pass 2) give each thread a run of outputs along W of
// one channel; the reductions give each block one channel (NCHW: reads along W) or 32 channels
// (channels_last: reads along C). Per-channel reductions are deterministic: every block writes its
// partial result to its own slot, and a one-thread-per-channel kernel merges the slots in a fixed
// order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fercuda/dwconv_math.h"

namespace fercuda {
namespace dwconv_kernels {

// ---------------------------------------------------------------------------------------------
// Per-element math.

constexpr int kThreads = 256;
// Channels_last reductions: 32 channels along a warp, 8 warps along positions.
constexpr int kChannelsLastCols = 32;

struct Geometry {
  int64_t x_sn, x_sc, x_sh, x_sw;  // element strides of x (NCHW or channels_last)
  int64_t y_sn, y_sc, y_sh, y_sw;  // element strides of the output (same memory format)
  int channels, h, w, ho, wo;
  int stride, pad;
};

// The 3x3 depthwise conv (without bias) at one output position, in float32.
template <typename scalar_t>
__device__ __forceinline__ float conv3x3_at(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                            const Geometry& g, int64_t n, int64_t c, int ho, int wo) {
  const scalar_t* plane = x + n * g.x_sn + c * g.x_sc;
  const scalar_t* wc = weight + c * 9;
  const int h0 = ho * g.stride - g.pad;
  const int w0 = wo * g.stride - g.pad;
  float acc = 0.f;
#pragma unroll
  for (int kh = 0; kh < 3; ++kh) {
    const int hi = h0 + kh;
    if (hi < 0 || hi >= g.h) continue;
#pragma unroll
    for (int kw = 0; kw < 3; ++kw) {
      const int wi = w0 + kw;
      if (wi < 0 || wi >= g.w) continue;
      acc = fmaf(static_cast<float>(wc[kh * 3 + kw]), static_cast<float>(plane[hi * g.x_sh + wi * g.x_sw]), acc);
    }
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Pass kernels.

// Outputs along W per thread in the one-pass kernels: neighbouring outputs share 3x3 windows, so a
// run of them loads each input once from a register row (10 loads for 8 outputs at stride 1
// instead of 72) and pays the index arithmetic and the per-channel parameters once.
template <int kStride>
struct ApplyRun {
  static constexpr int outputs = 8 / kStride;
  static constexpr int span = (outputs - 1) * kStride + 3;  // input columns the run reads
};

// Runs in memory order: NCHW (n, c, ho, run) with runs fastest, so a warp reads along W;
// channels_last (n, ho, run, c) with channels fastest, so a warp reads along C.
template <typename index_t, bool kChannelsLast>
__host__ __device__ __forceinline__ void decompose_run(index_t r, const Geometry& g, index_t runs_per_row, index_t& n,
                                                       index_t& c, int& ho, int& run) {
  if constexpr (kChannelsLast) {
    c = r % g.channels;
    index_t t = r / g.channels;
    run = static_cast<int>(t % runs_per_row);
    t /= runs_per_row;
    ho = static_cast<int>(t % g.ho);
    n = t / g.ho;
  } else {
    run = static_cast<int>(r % runs_per_row);
    index_t t = r / runs_per_row;
    ho = static_cast<int>(t % g.ho);
    t /= g.ho;
    c = t % g.channels;
    n = t / g.channels;
  }
}

// One thread's work in the one-pass kernel: y = relu6(conv(x) * scale + shift) for the run
// `r` of up to ApplyRun::outputs outputs along W. kFromRunning: scale/shift folded here from
// (bn_weight, bn_bias, running_mean, running_var, bias) in p0..p3; otherwise p0/p1 hold them.
template <typename scalar_t, typename index_t, bool kChannelsLast, bool kFromRunning, int kStride>
__host__ __device__ __forceinline__ void dwconv_bn_relu6_apply_run(
    index_t r, const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const float* __restrict__ p0, const float* __restrict__ p1, const float* __restrict__ p2,
    const float* __restrict__ p3, float eps, scalar_t* __restrict__ y, const Geometry& g, index_t runs_per_row) {
  constexpr int kOut = ApplyRun<kStride>::outputs;
  constexpr int kSpan = ApplyRun<kStride>::span;
  index_t n, c;
  int ho, run;
  decompose_run<index_t, kChannelsLast>(r, g, runs_per_row, n, c, ho, run);
  const int wo0 = run * kOut;

  float scale, shift;
  if constexpr (kFromRunning) {
    const float b = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    const dwconv::BNFold<float> fold = dwconv::bn_fold(b, p0[c], p1[c], p2[c], dwconv::invstd_of(p3[c], eps));
    scale = fold.scale;
    shift = fold.shift;
  } else {
    scale = p0[c];
    shift = p1[c];
  }
  float w[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) w[t] = static_cast<float>(weight[static_cast<int64_t>(c) * 9 + t]);

  const scalar_t* plane = x + static_cast<int64_t>(n) * g.x_sn + static_cast<int64_t>(c) * g.x_sc;
  const int h0 = ho * kStride - g.pad;
  const int w0 = wo0 * kStride - g.pad;
  float acc[kOut];
#pragma unroll
  for (int j = 0; j < kOut; ++j) acc[j] = 0.f;
#pragma unroll
  for (int kh = 0; kh < 3; ++kh) {
    const int hi = h0 + kh;
    if (hi < 0 || hi >= g.h) continue;
    const scalar_t* row = plane + static_cast<int64_t>(hi) * g.x_sh;
    float v[kSpan];
#pragma unroll
    for (int s = 0; s < kSpan; ++s) {
      const int wi = w0 + s;
      v[s] = (wi >= 0 && wi < g.w) ? static_cast<float>(row[static_cast<int64_t>(wi) * g.x_sw]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kOut; ++j) {
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) acc[j] = fmaf(w[kh * 3 + kw], v[j * kStride + kw], acc[j]);
    }
  }
  scalar_t* y_row = y + static_cast<int64_t>(n) * g.y_sn + static_cast<int64_t>(c) * g.y_sc +
                    static_cast<int64_t>(ho) * g.y_sh;
#pragma unroll
  for (int j = 0; j < kOut; ++j) {
    const int wo = wo0 + j;
    if (wo < g.wo) y_row[static_cast<int64_t>(wo) * g.y_sw] = static_cast<scalar_t>(dwconv::relu6(fmaf(acc[j], scale, shift)));
  }
}

template <typename scalar_t, typename index_t, bool kChannelsLast, bool kFromRunning, int kStride>
__global__ void __launch_bounds__(kThreads)
    dwconv_bn_relu6_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                 const scalar_t* __restrict__ bias, const float* __restrict__ p0,
                                 const float* __restrict__ p1, const float* __restrict__ p2,
                                 const float* __restrict__ p3, float eps, scalar_t* __restrict__ y, Geometry g,
                                 index_t total_runs, index_t runs_per_row) {
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (linear >= static_cast<int64_t>(total_runs)) return;
  dwconv_bn_relu6_apply_run<scalar_t, index_t, kChannelsLast, kFromRunning, kStride>(
      static_cast<index_t>(linear), x, weight, bias, p0, p1, p2, p3, eps, y, g, runs_per_row);
}

enum ReduceKind : int {
  kForwardStats = 0,   // partial (count, mean, M2) of the conv output (without bias)
  kBackwardSums = 1,   // partial sum(gy), sum(gy * xhat), gy = grad_out masked by ReLU6
  kBackwardGrads = 2,  // stores gz; partial sum(gz), sum(gz * x_tap) for the 9 taps
};

// Floats each thread of a reduction accumulates (one row of shared memory each), and floats per
// partial result in the scratch slots.
__host__ __device__ constexpr int reduce_acc_width(int kind) { return kind == kBackwardGrads ? 10 : 2; }
__host__ __device__ constexpr int reduce_slot_width(int kind) {
  return kind == kForwardStats ? 3 : (kind == kBackwardSums ? 2 : 10);
}
// Dynamic shared memory of a reduction block.
__host__ __device__ constexpr int reduce_shared_bytes(int kind) {
  return reduce_acc_width(kind) * kThreads * static_cast<int>(sizeof(float));
}

template <typename scalar_t>
struct ReduceArgs {
  const scalar_t* x;
  const scalar_t* weight;
  const scalar_t* bias;      // may be null
  const scalar_t* grad_out;  // backward only, output strides
  const float* bn_weight;    // backward only
  const float* bn_bias;
  const float* mean;         // of the conv output with bias (backward)
  const float* invstd;
  const float* coef;         // (C, 3): k, mean(gy), mean(gy * xhat) (backward pass 2)
  float* gz;                 // backward pass 2 output, output strides
  float* slots;              // (splits, C, slot width) partial results
  int64_t positions;         // N * Ho * Wo
  int64_t chunk;             // positions per split
};

// One block per (channel group, split of the positions). NCHW: one channel, 256 threads along
// positions (coalesced along W). channels_last: 32 channels x 8 position rows (coalesced along C).
template <typename scalar_t, typename index_t, bool kChannelsLast, int kKind>
__global__ void __launch_bounds__(kThreads)
    dwconv_reduce_kernel(const ReduceArgs<scalar_t> a, const Geometry g) {
  constexpr int kCols = kChannelsLast ? kChannelsLastCols : 1;
  constexpr int kRows = kThreads / kCols;
  constexpr int kAcc = reduce_acc_width(kKind);
  constexpr int kSlot = reduce_slot_width(kKind);
  // Dynamic, reduce_shared_bytes(kKind): one extern name serves every instantiation.
  extern __shared__ __align__(16) unsigned char reduce_smem[];
  float(*shared)[kThreads] = reinterpret_cast<float(*)[kThreads]>(reduce_smem);

  const int col = threadIdx.x % kCols;
  const int row = threadIdx.x / kCols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + col;
  const bool channel_valid = c < g.channels;
  const index_t p_begin = static_cast<index_t>(static_cast<int64_t>(blockIdx.y) * a.chunk);
  const int64_t p_stop = static_cast<int64_t>(p_begin) + a.chunk;
  const index_t p_end = static_cast<index_t>(p_stop < a.positions ? p_stop : a.positions);
  const index_t hw_out = static_cast<index_t>(g.ho) * g.wo;

  float acc[kAcc];
#pragma unroll
  for (int v = 0; v < kAcc; ++v) acc[v] = 0.f;

  // kForwardStats: sums of (v - shift_k) stay well-conditioned when shift_k is a sample of v;
  // every thread of a channel shares it (the conv at the split's first position).
  float shift_k = 0.f;
  if (channel_valid) {
    const float conv_bias = a.bias != nullptr ? static_cast<float>(a.bias[c]) : 0.f;
    float mean = 0.f, invstd = 0.f, gamma = 0.f, beta = 0.f, k = 0.f, mean_gy = 0.f, mean_gyx = 0.f;
    if constexpr (kKind == kForwardStats) {
      const index_t n0 = p_begin / hw_out;
      const index_t r0 = p_begin - n0 * hw_out;
      shift_k = conv3x3_at(a.x, a.weight, g, n0, c, static_cast<int>(r0 / g.wo), static_cast<int>(r0 % g.wo));
    } else {
      mean = a.mean[c];
      invstd = a.invstd[c];
      gamma = a.bn_weight[c];
      beta = a.bn_bias[c];
      if constexpr (kKind == kBackwardGrads) {
        k = a.coef[c * 3 + 0];
        mean_gy = a.coef[c * 3 + 1];
        mean_gyx = a.coef[c * 3 + 2];
      }
    }
    for (index_t p = p_begin + row; p < p_end; p += kRows) {
      const index_t n = p / hw_out;
      const index_t r = p - n * hw_out;
      const int ho = static_cast<int>(r / g.wo);
      const int wo = static_cast<int>(r - static_cast<index_t>(ho) * g.wo);
      const float conv = conv3x3_at(a.x, a.weight, g, n, c, ho, wo);
      if constexpr (kKind == kForwardStats) {
        const float d = conv - shift_k;
        acc[0] += d;
        acc[1] = fmaf(d, d, acc[1]);
      } else {
        const int64_t y_off = n * g.y_sn + c * g.y_sc + ho * g.y_sh + wo * g.y_sw;
        const float xhat = (conv + conv_bias - mean) * invstd;
        const float pre = fmaf(xhat, gamma, beta);
        const float gy = dwconv::relu6_passes(pre) ? static_cast<float>(a.grad_out[y_off]) : 0.f;
        if constexpr (kKind == kBackwardSums) {
          acc[0] += gy;
          acc[1] = fmaf(gy, xhat, acc[1]);
        } else {
          const float gz = k * (gy - mean_gy - xhat * mean_gyx);
          a.gz[y_off] = gz;
          acc[0] += gz;
          const scalar_t* plane = a.x + n * g.x_sn + c * g.x_sc;
          const int h0 = ho * g.stride - g.pad;
          const int w0 = wo * g.stride - g.pad;
#pragma unroll
          for (int kh = 0; kh < 3; ++kh) {
            const int hi = h0 + kh;
            if (hi < 0 || hi >= g.h) continue;
#pragma unroll
            for (int kw = 0; kw < 3; ++kw) {
              const int wi = w0 + kw;
              if (wi < 0 || wi >= g.w) continue;
              acc[1 + kh * 3 + kw] =
                  fmaf(gz, static_cast<float>(plane[hi * g.x_sh + wi * g.x_sw]), acc[1 + kh * 3 + kw]);
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int v = 0; v < kAcc; ++v) shared[v][threadIdx.x] = acc[v];
  __syncthreads();
  // Fixed-order tree over the rows of each channel column: deterministic.
  for (int s = kRows / 2; s > 0; s >>= 1) {
    if (row < s) {
#pragma unroll
      for (int v = 0; v < kAcc; ++v) shared[v][threadIdx.x] += shared[v][threadIdx.x + s * kCols];
    }
    __syncthreads();
  }
  if (row != 0 || !channel_valid) return;
  float* slot = a.slots + (static_cast<int64_t>(blockIdx.y) * g.channels + c) * kSlot;
  if constexpr (kKind == kForwardStats) {
    const float count = static_cast<float>(p_end - p_begin);
    const float sum = shared[0][threadIdx.x];
    const float sum_sq = shared[1][threadIdx.x];
    slot[0] = count;
    slot[1] = shift_k + sum / count;
    slot[2] = fmaxf(sum_sq - sum * (sum / count), 0.f);
  } else {
#pragma unroll
    for (int v = 0; v < kSlot; ++v) slot[v] = shared[v][threadIdx.x];
  }
}

// Training pass 1 -> statistics: Chan's merge of the per-split (count, mean, M2) in a fixed
// order, in double. Writes save_mean / save_invstd (of the conv output with bias), updates the
// running statistics as nn.BatchNorm2d (unbiased variance), and the scale/shift of pass 2.
__global__ void dwconv_finalize_stats_kernel(const float* __restrict__ slots, int splits, int channels,
                                             const float* __restrict__ bias_f, const float* __restrict__ bn_weight,
                                             const float* __restrict__ bn_bias, float* __restrict__ running_mean,
                                             float* __restrict__ running_var, float eps, float momentum,
                                             float* __restrict__ save_mean, float* __restrict__ save_invstd,
                                             float* __restrict__ scale, float* __restrict__ shift) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double count = 0.0, mean = 0.0, m2 = 0.0;
  for (int s = 0; s < splits; ++s) {
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * reduce_slot_width(kForwardStats);
    const double nb = slot[0], mb = slot[1], m2b = slot[2];
    const double total = count + nb;
    const double delta = mb - mean;
    mean += delta * (nb / total);
    m2 += m2b + delta * delta * (count * nb / total);
    count = total;
  }
  const double var_biased = m2 / count;
  const float invstd = static_cast<float>(1.0 / sqrt(var_biased + static_cast<double>(eps)));
  const double conv_bias = bias_f != nullptr ? bias_f[c] : 0.0;
  const double mean_z = mean + conv_bias;
  save_mean[c] = static_cast<float>(mean_z);
  save_invstd[c] = invstd;
  const double var_unbiased = count > 1.0 ? m2 / (count - 1.0) : var_biased;
  running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * mean_z);
  running_var[c] = static_cast<float>((1.0 - momentum) * running_var[c] + momentum * var_unbiased);
  const float s = bn_weight[c] * invstd;
  scale[c] = s;
  // y = (conv + bias - mean_z) * s + beta = conv * s + (beta - mean * s), mean without bias.
  shift[c] = bn_bias[c] - static_cast<float>(mean) * s;
}

// Backward pass 1 -> grad_bn_bias = sum(gy), grad_bn_weight = sum(gy * xhat), and the
// coefficients of gz = k * (gy - mean(gy) - xhat * mean(gy * xhat)), k = gamma * invstd
// (training); gz = k * gy with constant statistics.
__global__ void dwconv_finalize_bn_grads_kernel(const float* __restrict__ slots, int splits, int channels,
                                                double positions, bool training,
                                                const float* __restrict__ bn_weight,
                                                const float* __restrict__ invstd, float* __restrict__ grad_bn_weight,
                                                float* __restrict__ grad_bn_bias, float* __restrict__ coef) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double sum_gy = 0.0, sum_gyx = 0.0;
  for (int s = 0; s < splits; ++s) {
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * reduce_slot_width(kBackwardSums);
    sum_gy += slot[0];
    sum_gyx += slot[1];
  }
  grad_bn_bias[c] = static_cast<float>(sum_gy);
  grad_bn_weight[c] = static_cast<float>(sum_gyx);
  coef[c * 3 + 0] = bn_weight[c] * invstd[c];
  coef[c * 3 + 1] = training ? static_cast<float>(sum_gy / positions) : 0.f;
  coef[c * 3 + 2] = training ? static_cast<float>(sum_gyx / positions) : 0.f;
}

// Backward pass 2 -> grad_bias = sum(gz), grad_weight[c, tap] = sum(gz * x_tap).
template <typename scalar_t>
__global__ void dwconv_finalize_conv_grads_kernel(const float* __restrict__ slots, int splits, int channels,
                                                  scalar_t* __restrict__ grad_weight,
                                                  scalar_t* __restrict__ grad_bias) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double sums[10] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int s = 0; s < splits; ++s) {
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * reduce_slot_width(kBackwardGrads);
#pragma unroll
    for (int v = 0; v < 10; ++v) sums[v] += slot[v];
  }
  grad_bias[c] = static_cast<scalar_t>(static_cast<float>(sums[0]));
#pragma unroll
  for (int t = 0; t < 9; ++t) grad_weight[c * 9 + t] = static_cast<scalar_t>(static_cast<float>(sums[1 + t]));
}

// Backward pass 3: grad_x = transposed depthwise conv of gz, one thread per input element.
template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    dwconv_grad_input_kernel(const float* __restrict__ gz, const scalar_t* __restrict__ weight,
                             scalar_t* __restrict__ grad_x, Geometry g, index_t total) {
  const int64_t linear = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (linear >= static_cast<int64_t>(total)) return;
  const index_t i = static_cast<index_t>(linear);
  // Input coordinates: decompose with the input's spatial size.
  index_t n, c;
  int hi, wi;
  if constexpr (kChannelsLast) {
    c = i % g.channels;
    index_t t = i / g.channels;
    wi = static_cast<int>(t % g.w);
    t /= g.w;
    hi = static_cast<int>(t % g.h);
    n = t / g.h;
  } else {
    wi = static_cast<int>(i % g.w);
    index_t t = i / g.w;
    hi = static_cast<int>(t % g.h);
    t /= g.h;
    c = t % g.channels;
    n = t / g.channels;
  }
  const float* gz_plane = gz + n * g.y_sn + c * g.y_sc;
  const scalar_t* wc = weight + c * 9;
  float acc = 0.f;
#pragma unroll
  for (int kh = 0; kh < 3; ++kh) {
    // Output row ho reads input row ho * stride - pad + kh.
    const int th = hi + g.pad - kh;
    if (th < 0 || th % g.stride != 0) continue;
    const int ho = th / g.stride;
    if (ho >= g.ho) continue;
#pragma unroll
    for (int kw = 0; kw < 3; ++kw) {
      const int tw = wi + g.pad - kw;
      if (tw < 0 || tw % g.stride != 0) continue;
      const int wo = tw / g.stride;
      if (wo >= g.wo) continue;
      acc = fmaf(static_cast<float>(wc[kh * 3 + kw]), gz_plane[ho * g.y_sh + wo * g.y_sw], acc);
    }
  }
  grad_x[i] = static_cast<scalar_t>(acc);
}

// ---------------------------------------------------------------------------------------------
// Launch plans: every number a launch needs (grid, block, shared memory, scratch sizes, the index
// type), computed on the host from the sizes alone. dwconv_cuda.cu and the emulated tests both
// call these, so the tests launch what the GPU is given.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One call's sizes, layout and element strides; x, y and grad_x are contiguous in the layout.
struct Problem {
  Geometry g;
  int64_t n;
  bool channels_last;
};

// C, H, W and the output extents must each fit in int (the caller checks).
inline Problem make_problem(int64_t n, int64_t c, int64_t h, int64_t w, int64_t stride, int64_t padding,
                            bool channels_last) {
  const int64_t ho = dwconv::out_size(h, stride, padding), wo = dwconv::out_size(w, stride, padding);
  Problem p;
  p.n = n;
  p.channels_last = channels_last;
  Geometry& g = p.g;
  g.channels = static_cast<int>(c);
  g.h = static_cast<int>(h);
  g.w = static_cast<int>(w);
  g.ho = static_cast<int>(ho);
  g.wo = static_cast<int>(wo);
  g.stride = static_cast<int>(stride);
  g.pad = static_cast<int>(padding);
  if (channels_last) {
    g.x_sn = h * w * c, g.x_sc = 1, g.x_sh = w * c, g.x_sw = c;
    g.y_sn = ho * wo * c, g.y_sc = 1, g.y_sh = wo * c, g.y_sw = c;
  } else {
    g.x_sn = c * h * w, g.x_sc = h * w, g.x_sh = w, g.x_sw = 1;
    g.y_sn = c * ho * wo, g.y_sc = ho * wo, g.y_sh = wo, g.y_sw = 1;
  }
  return p;
}

inline int64_t output_positions(const Problem& p) { return p.n * static_cast<int64_t>(p.g.ho) * p.g.wo; }

// Switches for the tests; the op keeps the defaults.
struct LaunchSwitches {
  // Take the 64-bit index path, which otherwise only tensors of about 2^31 elements take.
  bool force_int64_index = false;
  // Positions per reduction split at least; 0: four per thread. Small values force many splits.
  int64_t reduce_min_chunk = 0;
};

// 32-bit index arithmetic where it cannot overflow (64-bit division is several times slower):
// `extent` bounds the indices a kernel forms, and the last block reaches up to kThreads past it.
inline bool use_int64_index(int64_t extent, const LaunchSwitches& s) {
  return s.force_int64_index || extent >= (int64_t{1} << 31) - kThreads;
}

struct Launch {
  int64_t grid_x;  // the caller checks it against the GPU's limit
  int64_t grid_y;
  int threads;
  int shared_bytes;  // dynamic shared memory
  bool int64_index;  // index_t of the kernel: int64_t, else int32_t
};

// The one-pass kernel (inference, training pass 2): a thread per run of outputs along W.
struct ApplyPlan {
  Launch launch;
  int64_t runs_per_row;
  int64_t total_runs;
};

inline ApplyPlan plan_apply(const Problem& p, const LaunchSwitches& s = {}) {
  const int outputs = p.g.stride == 1 ? ApplyRun<1>::outputs : ApplyRun<2>::outputs;
  ApplyPlan plan;
  plan.runs_per_row = ceil_div(p.g.wo, outputs);
  plan.total_runs = p.n * p.g.channels * p.g.ho * plan.runs_per_row;
  plan.launch = {ceil_div(plan.total_runs, kThreads), 1, kThreads, 0, use_int64_index(plan.total_runs, s)};
  return plan;
}

// A reduction over the N*Ho*Wo positions of each channel: a grid of (channel groups, splits of
// the positions), enough blocks to fill the GPU a few times over, each split long enough (four
// positions a thread) to amortize its tree. Its partial results fill (splits, C, slot_width)
// floats of scratch.
struct ReducePlan {
  Launch launch;
  int64_t positions;
  int64_t chunk;  // positions per split
  int splits;
  int slot_width;
};

inline ReducePlan plan_reduce(const Problem& p, int kind, int sm_count, const LaunchSwitches& s = {}) {
  const int cols = p.channels_last ? kChannelsLastCols : 1;
  ReducePlan plan;
  plan.positions = output_positions(p);
  const int64_t channel_groups = ceil_div(p.g.channels, cols);
  const int64_t target_blocks = 8LL * sm_count;
  const int64_t min_chunk = s.reduce_min_chunk > 0 ? s.reduce_min_chunk : 4LL * (kThreads / cols);
  int64_t splits = std::max<int64_t>(1, ceil_div(target_blocks, channel_groups));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, ceil_div(plan.positions, min_chunk)));
  splits = std::min<int64_t>(splits, 65535);  // grid.y
  plan.chunk = ceil_div(plan.positions, splits);
  plan.splits = static_cast<int>(ceil_div(plan.positions, plan.chunk));
  plan.slot_width = reduce_slot_width(kind);
  plan.launch = {channel_groups, plan.splits, kThreads, reduce_shared_bytes(kind),
                 use_int64_index(plan.positions + plan.chunk, s)};
  return plan;
}

// The finalize kernels: a thread per channel.
inline Launch plan_per_channel(const Problem& p) {
  return {ceil_div(p.g.channels, kThreads), 1, kThreads, 0, false};
}

// Backward pass 3: a thread per element of grad_x.
struct GradInputPlan {
  Launch launch;
  int64_t total;
};

inline GradInputPlan plan_grad_input(const Problem& p, const LaunchSwitches& s = {}) {
  GradInputPlan plan;
  plan.total = p.n * p.g.channels * static_cast<int64_t>(p.g.h) * p.g.w;
  plan.launch = {ceil_div(plan.total, kThreads), 1, kThreads, 0, use_int64_index(plan.total, s)};
  return plan;
}

// The template arguments a plan's kernel is instantiated with: f(index tag, layout tag), int32_t or
// int64_t and std::true_type for channels_last; f(stride tag), std::integral_constant<int, stride>.
template <typename F>
void dispatch_index_and_layout(bool int64_index, bool channels_last, F&& f) {
  if (int64_index) {
    if (channels_last) f(int64_t{}, std::true_type{});
    else f(int64_t{}, std::false_type{});
  } else {
    if (channels_last) f(int32_t{}, std::true_type{});
    else f(int32_t{}, std::false_type{});
  }
}

template <typename F>
void dispatch_stride(int stride, F&& f) {
  if (stride == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

}  // namespace dwconv_kernels
}  // namespace fercuda

// Fused depthwise 3x3 convolution + BatchNorm + ReLU6: CUDA kernels.
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "fercuda/checks.h"
#include "fercuda/dwconv_math.h"

namespace fercuda {
namespace {

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

template <int kKind>
struct ReduceWidth;
template <>
struct ReduceWidth<kForwardStats> {
  static constexpr int acc = 2, slot = 3;
};
template <>
struct ReduceWidth<kBackwardSums> {
  static constexpr int acc = 2, slot = 2;
};
template <>
struct ReduceWidth<kBackwardGrads> {
  static constexpr int acc = 10, slot = 10;
};

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
  constexpr int kAcc = ReduceWidth<kKind>::acc;
  constexpr int kSlot = ReduceWidth<kKind>::slot;
  __shared__ float shared[kAcc][kThreads];

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
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * 3;
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
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * 2;
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
    const float* slot = slots + (static_cast<int64_t>(s) * channels + c) * 10;
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
// Host side.

// The dtypes the validation admits, and no others (double would only cost compile time).
#define FERCUDA_DISPATCH_DWCONV_TYPES(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

struct Prepared {
  at::Tensor x;  // NCHW- or channels_last-contiguous
  at::MemoryFormat format;
  bool channels_last;
  Geometry g;
  int64_t n;
};

int64_t conv_out_size(int64_t in, int64_t stride, int64_t padding) { return (in + 2 * padding - 3) / stride + 1; }

// The kernels index channels, rows and columns with int.
Prepared prepare(const char* op, const at::Tensor& x_in, int64_t stride, int64_t padding) {
  Prepared p;
  p.format = x_in.suggest_memory_format();
  p.channels_last = p.format == at::MemoryFormat::ChannelsLast;
  p.x = x_in.contiguous(p.format);
  const int64_t n = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  // The padded extents bound the output's too.
  const bool fits = c <= kIntMax && padding <= kIntMax / 4 && h + 2 * padding <= kIntMax && w + 2 * padding <= kIntMax;
  TORCH_CHECK(fits, "fercuda.", op, ": C and the padded H and W must each fit in int32, got shape ", shape_str(x_in),
              " and padding ", padding);
  const int64_t ho = conv_out_size(h, stride, padding), wo = conv_out_size(w, stride, padding);
  p.n = n;
  Geometry& g = p.g;
  g.channels = static_cast<int>(c);
  g.h = static_cast<int>(h);
  g.w = static_cast<int>(w);
  g.ho = static_cast<int>(ho);
  g.wo = static_cast<int>(wo);
  g.stride = static_cast<int>(stride);
  g.pad = static_cast<int>(padding);
  if (p.channels_last) {
    g.x_sn = h * w * c, g.x_sc = 1, g.x_sh = w * c, g.x_sw = c;
    g.y_sn = ho * wo * c, g.y_sc = 1, g.y_sh = wo * c, g.y_sw = c;
  } else {
    g.x_sn = c * h * w, g.x_sc = h * w, g.x_sh = w, g.x_sw = 1;
    g.y_sn = c * ho * wo, g.y_sc = ho * wo, g.y_sh = wo, g.y_sw = 1;
  }
  return p;
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Splits of the N*Ho*Wo positions per channel group: enough blocks to fill the GPU a few
// times over, each split long enough (>= 4 positions a thread) to amortize its reduction.
struct ReducePlan {
  int64_t chunk;
  int splits;
  int channel_groups;
};

ReducePlan plan_reduce(const Prepared& p) {
  const int cols = p.channels_last ? kChannelsLastCols : 1;
  const int64_t positions = p.n * static_cast<int64_t>(p.g.ho) * p.g.wo;
  ReducePlan plan;
  plan.channel_groups = static_cast<int>(ceil_div(p.g.channels, cols));
  const int64_t target_blocks = 8LL * sm_count();
  const int64_t min_chunk = 4LL * (kThreads / cols);
  int64_t splits = std::max<int64_t>(1, ceil_div(target_blocks, plan.channel_groups));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, ceil_div(positions, min_chunk)));
  splits = std::min<int64_t>(splits, 65535);
  plan.chunk = ceil_div(positions, splits);
  plan.splits = static_cast<int>(ceil_div(positions, plan.chunk));
  return plan;
}

template <typename F>
void dispatch_index_and_layout(int64_t total, bool channels_last, F&& f) {
  // 32-bit index arithmetic where it cannot overflow: 64-bit division is several times slower.
  const bool narrow = total < (int64_t{1} << 31) - kThreads;
  if (narrow) {
    if (channels_last) f(int32_t{}, std::true_type{});
    else f(int32_t{}, std::false_type{});
  } else {
    if (channels_last) f(int64_t{}, std::true_type{});
    else f(int64_t{}, std::false_type{});
  }
}

template <typename scalar_t, int kKind>
void launch_reduce(const Prepared& p, const ReducePlan& plan, const ReduceArgs<scalar_t>& args,
                   cudaStream_t stream) {
  const dim3 grid(plan.channel_groups, plan.splits);
  dispatch_index_and_layout(args.positions + args.chunk, p.channels_last, [&](auto index_tag, auto cl_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kCL = decltype(cl_tag)::value;
    dwconv_reduce_kernel<scalar_t, index_t, kCL, kKind><<<grid, kThreads, 0, stream>>>(args, p.g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_apply(const char* op, const Prepared& p, const at::Tensor& weight, const scalar_t* bias,
                  bool from_running, const float* p0, const float* p1, const float* p2, const float* p3, double eps,
                  at::Tensor& y, cudaStream_t stream) {
  auto launch = [&](auto stride_tag) {
    constexpr int kStride = decltype(stride_tag)::value;
    const int64_t runs_per_row = ceil_div(p.g.wo, ApplyRun<kStride>::outputs);
    const int64_t total_runs = p.n * p.g.channels * p.g.ho * runs_per_row;
    const int64_t blocks = ceil_div(total_runs, kThreads);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": output too large, ", y.numel(),
                " elements");
    dispatch_index_and_layout(total_runs, p.channels_last, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kCL = decltype(cl_tag)::value;
      auto run = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            p.x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias, p0, p1, p2, p3,
            static_cast<float>(eps), y.mutable_data_ptr<scalar_t>(), p.g, static_cast<index_t>(total_runs),
            static_cast<index_t>(runs_per_row));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (from_running) run(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, true, kStride>);
      else run(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, false, kStride>);
    });
  };
  if (p.g.stride == 1) launch(std::integral_constant<int, 1>{});
  else launch(std::integral_constant<int, 2>{});
}

at::Tensor empty_output(const Prepared& p) {
  return at::empty({p.n, p.g.channels, p.g.ho, p.g.wo}, p.x.options().memory_format(p.format));
}

at::Tensor dwconv_bn_relu6_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var, int64_t stride,
                                int64_t padding, double eps) {
  const char* op = "dwconv_bn_relu6";
  check_dwconv_args(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding);
  check_dwconv_eps(op, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(op, x, stride, padding);
  at::Tensor y = empty_output(p);
  if (y.numel() == 0) return y;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor bn_w = as_float(bn_weight), bn_b = as_float(bn_bias);
  const at::Tensor mean = as_float(running_mean), var = as_float(running_var);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_DWCONV_TYPES(x.scalar_type(), "fercuda.dwconv_bn_relu6", [&] {
    launch_apply<scalar_t>(op, p, w, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, /*from_running=*/true,
                           bn_w.const_data_ptr<float>(), bn_b.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                           var.const_data_ptr<float>(), eps, y, stream);
  });
  return y;
}

// Functional: the updated running statistics come back as new tensors (autograd formulas can
// only be registered for ops that leave their inputs alone); fercuda.ops copies them into the buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, int64_t stride,
    int64_t padding, double eps, double momentum) {
  const char* op = "dwconv_bn_relu6_train";
  const auto out = check_dwconv_args(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding);
  check_dwconv_eps(op, eps);
  check_dwconv_momentum(op, momentum);
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(op, x, stride, padding);
  const int64_t positions = p.n * static_cast<int64_t>(p.g.ho) * p.g.wo;
  at::Tensor y = empty_output(p);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor save_mean = at::empty({p.g.channels}, f32);
  at::Tensor save_invstd = at::empty({p.g.channels}, f32);
  if (y.numel() == 0) {
    save_mean.zero_();
    save_invstd.zero_();
    return {y, save_mean, save_invstd, running_mean.clone(), running_var.clone()};
  }
  check_dwconv_batch_stats(op, out[0], out[1], out[2], out[3]);

  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor b_f = bias.has_value() ? as_float(*bias) : at::Tensor();
  const at::Tensor bn_w = as_float(bn_weight), bn_b = as_float(bn_bias);
  // The update runs on fresh float32 copies of the running statistics, returned in their dtype.
  at::Tensor rm = running_mean.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor rv = running_var.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor scale_shift = at::empty({2, p.g.channels}, f32);

  const ReducePlan plan = plan_reduce(p);
  at::Tensor slots = at::empty({plan.splits, p.g.channels, ReduceWidth<kForwardStats>::slot}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_DWCONV_TYPES(x.scalar_type(), "fercuda.dwconv_bn_relu6_train", [&] {
    ReduceArgs<scalar_t> args{};
    args.x = p.x.const_data_ptr<scalar_t>();
    args.weight = w.const_data_ptr<scalar_t>();
    args.slots = slots.mutable_data_ptr<float>();
    args.positions = positions;
    args.chunk = plan.chunk;
    launch_reduce<scalar_t, kForwardStats>(p, plan, args, stream);

    const int channel_blocks = static_cast<int>(ceil_div(p.g.channels, kThreads));
    dwconv_finalize_stats_kernel<<<channel_blocks, kThreads, 0, stream>>>(
        slots.const_data_ptr<float>(), plan.splits, p.g.channels, b_f.defined() ? b_f.const_data_ptr<float>() : nullptr,
        bn_w.const_data_ptr<float>(), bn_b.const_data_ptr<float>(), rm.mutable_data_ptr<float>(),
        rv.mutable_data_ptr<float>(), static_cast<float>(eps), static_cast<float>(momentum),
        save_mean.mutable_data_ptr<float>(), save_invstd.mutable_data_ptr<float>(),
        scale_shift.mutable_data_ptr<float>(), scale_shift.mutable_data_ptr<float>() + p.g.channels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_apply<scalar_t>(op, p, w, nullptr, /*from_running=*/false, scale_shift.const_data_ptr<float>(),
                           scale_shift.const_data_ptr<float>() + p.g.channels, nullptr, nullptr, eps, y, stream);
  });
  return {y, save_mean, save_invstd, rm.to(running_mean.scalar_type()), rv.to(running_var.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    int64_t stride, int64_t padding, bool training) {
  const char* op = "dwconv_bn_relu6_backward";
  const auto out = check_dwconv_args(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, "mean",
                                     "invstd");
  check_dwconv_grad_out(op, grad_out, x, out);
  const int64_t ho = out[2], wo = out[3];
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(op, x, stride, padding);
  const int64_t channels = p.g.channels;
  const int64_t positions = p.n * ho * wo;

  at::Tensor grad_x = at::empty(p.x.sizes(), p.x.options().memory_format(p.format));
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_bias = at::empty({channels}, weight.options());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_bn_weight_f = at::empty({channels}, f32);
  at::Tensor grad_bn_bias_f = at::empty({channels}, f32);
  auto finish_bn = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type());
  };
  if (channels == 0) {
    return {grad_x, grad_weight, grad_bias, finish_bn(grad_bn_weight_f, bn_weight), finish_bn(grad_bn_bias_f, bn_bias)};
  }
  if (positions == 0 || x.numel() == 0) {
    grad_x.zero_();
    grad_weight.zero_();
    grad_bias.zero_();
    grad_bn_weight_f.zero_();
    grad_bn_bias_f.zero_();
    return {grad_x, grad_weight, grad_bias, finish_bn(grad_bn_weight_f, bn_weight), finish_bn(grad_bn_bias_f, bn_bias)};
  }

  const at::Tensor g = grad_out.contiguous(p.format);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor bn_w = as_float(bn_weight), bn_b = as_float(bn_bias);
  const at::Tensor mean_f = as_float(mean), invstd_f = as_float(invstd);
  at::Tensor coef = at::empty({channels, 3}, f32);
  at::Tensor gz = at::empty({p.n, channels, ho, wo}, f32.memory_format(p.format));

  const ReducePlan plan = plan_reduce(p);
  at::Tensor slots_sums = at::empty({plan.splits, channels, ReduceWidth<kBackwardSums>::slot}, f32);
  at::Tensor slots_grads = at::empty({plan.splits, channels, ReduceWidth<kBackwardGrads>::slot}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int channel_blocks = static_cast<int>(ceil_div(channels, kThreads));
  FERCUDA_DISPATCH_DWCONV_TYPES(x.scalar_type(), "fercuda.dwconv_bn_relu6_backward", [&] {
    ReduceArgs<scalar_t> args{};
    args.x = p.x.const_data_ptr<scalar_t>();
    args.weight = w.const_data_ptr<scalar_t>();
    args.bias = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    args.grad_out = g.const_data_ptr<scalar_t>();
    args.bn_weight = bn_w.const_data_ptr<float>();
    args.bn_bias = bn_b.const_data_ptr<float>();
    args.mean = mean_f.const_data_ptr<float>();
    args.invstd = invstd_f.const_data_ptr<float>();
    args.positions = positions;
    args.chunk = plan.chunk;

    args.slots = slots_sums.mutable_data_ptr<float>();
    launch_reduce<scalar_t, kBackwardSums>(p, plan, args, stream);
    dwconv_finalize_bn_grads_kernel<<<channel_blocks, kThreads, 0, stream>>>(
        slots_sums.const_data_ptr<float>(), plan.splits, static_cast<int>(channels), static_cast<double>(positions),
        training, bn_w.const_data_ptr<float>(), invstd_f.const_data_ptr<float>(),
        grad_bn_weight_f.mutable_data_ptr<float>(), grad_bn_bias_f.mutable_data_ptr<float>(),
        coef.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    args.coef = coef.const_data_ptr<float>();
    args.gz = gz.mutable_data_ptr<float>();
    args.slots = slots_grads.mutable_data_ptr<float>();
    launch_reduce<scalar_t, kBackwardGrads>(p, plan, args, stream);
    dwconv_finalize_conv_grads_kernel<scalar_t><<<channel_blocks, kThreads, 0, stream>>>(
        slots_grads.const_data_ptr<float>(), plan.splits, static_cast<int>(channels),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t total = grad_x.numel();
    const int64_t blocks = ceil_div(total, kThreads);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": input too large, ", total,
                " elements");
    dispatch_index_and_layout(total, p.channels_last, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kCL = decltype(cl_tag)::value;
      dwconv_grad_input_kernel<scalar_t, index_t, kCL><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          gz.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p.g,
          static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_weight, grad_bias, finish_bn(grad_bn_weight_f, bn_weight), finish_bn(grad_bn_bias_f, bn_bias)};
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CUDA, m) {
  m.impl("dwconv_bn_relu6", &fercuda::dwconv_bn_relu6_cuda);
  m.impl("dwconv_bn_relu6_train", &fercuda::dwconv_bn_relu6_train_cuda);
  m.impl("dwconv_bn_relu6_backward", &fercuda::dwconv_bn_relu6_backward_cuda);
}

// Device code of the BatchNorm + ReLU6 (or identity) + residual add CUDA kernels, and the plan of
// every launch (grid, block, shared memory, scratch sizes); bn_act_cuda.cu holds the op glue. Kept
// apart so that tests/test_bn_act.py (its "emulated" cases) can compile it for the CPU against an
// emulation of the CUDA built-ins (tests/cuda_emulation.h), launch it as the op does, and compare
// it with float64 PyTorch on a machine without a GPU.
//
// x is addressed as (N, C, P), P = H * W positions, NCHW or channels_last; flat positions
// q = n * P + p. Passes over memory:
//   inference          1 pass : y = act(x * scale + shift) + residual.
//   training forward   2 passes: (1) per-(channel, chunk of positions) count, mean and M2, merged per
//                                channel (Chan) by a one-thread-per-channel kernel in double, which
//                                also updates the running statistics; (2) the inference pass.
//   backward           2 passes: (1) per-(channel, chunk) sum(ga) and sum(ga * xhat), merged per
//                                channel into grad_bias, grad_weight and grad_x's coefficients;
//                                (2) grad_x.
// The reductions give each block one channel (NCHW: threads along positions, reading along W) or
// 32 channels (channels_last: a warp along C, 8 warps along positions); they are deterministic:
// every block writes its chunk's result to its own slot, merged in a fixed order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fercuda/bn_act_math.h"

namespace fercuda {
namespace bn_act_kernels {

constexpr int kThreads = 256;
constexpr int kChannelsLastCols = 32;  // channels a channels_last reduction block covers
constexpr int kSlot = 3;               // floats a reduction slot holds
constexpr int kKindStats = 0;          // reduction of x: count, mean, M2
constexpr int kKindGrad = 1;           // reduction of the gradient: sum(ga), sum(ga * xhat)

struct Problem {
  int64_t n, c, p;  // batch, channels, positions per image
  bool channels_last;

  __host__ __device__ int64_t positions() const { return n * p; }
  __host__ __device__ int64_t total() const { return n * c * p; }
};

// Element offset of position q of channel c.
__host__ __device__ __forceinline__ int64_t offset_of(const Problem& pr, int64_t q, int64_t c) {
  return pr.channels_last ? q * pr.c + c : ((q / pr.p) * pr.c + c) * pr.p + q % pr.p;
}

__host__ __device__ __forceinline__ int64_t channel_of(const Problem& pr, int64_t i) {
  return pr.channels_last ? i % pr.c : (i / pr.p) % pr.c;
}

// ---------------------------------------------------------------------------------------------
// Launch plans.

struct ReducePlan {
  int64_t groups;  // grid x: channel groups
  int64_t splits;  // grid y: chunks of the positions
  int64_t chunk;   // positions a chunk holds
  int threads;
  int64_t shared_bytes;
};

// Enough blocks to fill the GPU several times (8 per SM), chunks of at least `min_chunk` positions
// (default: 4 rows of the block's threads, so every thread reads something), at most 65535 splits.
inline ReducePlan plan_reduce(const Problem& pr, int sm_count, int64_t min_chunk = 0) {
  const int64_t cols = pr.channels_last ? kChannelsLastCols : 1;
  const int64_t rows = kThreads / cols;
  const int64_t groups = (pr.c + cols - 1) / cols;
  const int64_t positions = pr.positions();
  const int64_t least = std::max<int64_t>(1, min_chunk > 0 ? min_chunk : 4 * rows);
  int64_t splits = std::max<int64_t>(1, (8 * static_cast<int64_t>(sm_count) + groups - 1) / groups);
  splits = std::min<int64_t>({splits, std::max<int64_t>(1, (positions + least - 1) / least), int64_t{65535}});
  const int64_t chunk = (positions + splits - 1) / splits;
  splits = (positions + chunk - 1) / chunk;
  return {groups, splits, chunk, kThreads, static_cast<int64_t>(2 * kThreads * sizeof(float))};
}

inline int64_t elementwise_blocks(int64_t total) { return (total + kThreads - 1) / kThreads; }
inline int64_t per_channel_blocks(int64_t channels) { return (channels + kThreads - 1) / kThreads; }

// ---------------------------------------------------------------------------------------------
// Kernels.

// The block's deterministic tree sum of its rows per column (kCols columns of threads, kRows rows):
// afterwards shared[col] holds column col's sum.
template <int kCols, int kRows>
__device__ __forceinline__ void sum_rows(float* shared, float v) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll 1
  for (int half = kRows / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) / kCols < half) shared[threadIdx.x] += shared[threadIdx.x + half * kCols];
    __syncthreads();
  }
}

// Slot (split, c) of `part`: kKindStats count, mean and M2 of the chunk (two sweeps: the sum, then
// the deviations from the chunk's mean, in cache by then); kKindGrad sum(ga), sum(ga * xhat), with
// ga = g where the activation passes it and a = weight * xhat + bias.
template <typename scalar_t, bool kChannelsLast, int kKind, bool kRelu6>
__global__ void __launch_bounds__(kThreads)
    bn_act_reduce_kernel(float* __restrict__ part, const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                         const float* __restrict__ mean, const float* __restrict__ invstd,
                         const float* __restrict__ weight, const float* __restrict__ bias, Problem pr,
                         int64_t chunk) {
  constexpr int kCols = kChannelsLast ? kChannelsLastCols : 1;
  constexpr int kRows = kThreads / kCols;
  // Dynamic, ReducePlan::shared_bytes: two rows of kThreads floats.
  extern __shared__ __align__(16) unsigned char bn_act_smem[];
  float* const shared = reinterpret_cast<float*>(bn_act_smem);
  float* const shared2 = shared + kThreads;
  const int col = static_cast<int>(threadIdx.x) % kCols;
  const int row = static_cast<int>(threadIdx.x) / kCols;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + col;
  const bool valid = c < pr.c;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < pr.positions() ? begin + chunk : pr.positions();
  float* const slot = part + (split * pr.c + c) * kSlot;
  if constexpr (kKind == kKindStats) {
    float sum = 0.f;
    if (valid)
      for (int64_t q = begin + row; q < end; q += kRows) sum += static_cast<float>(x[offset_of(pr, q, c)]);
    sum_rows<kCols, kRows>(shared, sum);
    const float count = static_cast<float>(end - begin);
    const float mu = shared[col] / count;
    float m2 = 0.f;
    if (valid)
      for (int64_t q = begin + row; q < end; q += kRows) {
        const float d = static_cast<float>(x[offset_of(pr, q, c)]) - mu;
        m2 = fmaf(d, d, m2);
      }
    sum_rows<kCols, kRows>(shared2, m2);
    if (row == 0 && valid) {
      slot[0] = count;
      slot[1] = mu;
      slot[2] = shared2[col];
    }
  } else {
    float s_ga = 0.f, s_gx = 0.f;
    if (valid) {
      const float mu = mean[c], is = invstd[c];
      const bn_act::Affine<float> af = bn_act::affine(weight[c], bias[c], mu, is);
      for (int64_t q = begin + row; q < end; q += kRows) {
        const int64_t o = offset_of(pr, q, c);
        const float xv = static_cast<float>(x[o]);
        const float ga = bn_act::act_passes(fmaf(xv, af.scale, af.shift), kRelu6) ? static_cast<float>(g[o]) : 0.f;
        s_ga += ga;
        s_gx = fmaf(ga, (xv - mu) * is, s_gx);
      }
    }
    sum_rows<kCols, kRows>(shared, s_ga);
    sum_rows<kCols, kRows>(shared2, s_gx);
    if (row == 0 && valid) {
      slot[0] = shared[col];
      slot[1] = shared2[col];
      slot[2] = 0.f;
    }
  }
}

// One thread per channel: Chan's merge of the splits' (count, mean, M2) in double, in split order;
// the batch mean and invstd saved for the backward; running_mean / running_var (float32) updated in
// place as nn.BatchNorm2d does (momentum, unbiased variance).
__global__ void __launch_bounds__(kThreads)
    bn_act_merge_stats_kernel(const float* __restrict__ part, int64_t splits, int64_t channels, float eps,
                              float momentum, float* __restrict__ save_mean, float* __restrict__ save_invstd,
                              float* __restrict__ running_mean, float* __restrict__ running_var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  double n_a = 0.0, mean_a = 0.0, m2_a = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    const float* slot = part + (s * channels + c) * kSlot;
    const double n_b = slot[0], mean_b = slot[1], m2_b = slot[2];
    const double n = n_a + n_b, delta = mean_b - mean_a;
    mean_a += delta * (n_b / n);
    m2_a += m2_b + delta * delta * (n_a * n_b / n);
    n_a = n;
  }
  save_mean[c] = static_cast<float>(mean_a);
  save_invstd[c] = static_cast<float>(1.0 / sqrt(m2_a / n_a + static_cast<double>(eps)));
  const double m = momentum;
  running_mean[c] = static_cast<float>(running_mean[c] * (1.0 - m) + mean_a * m);
  running_var[c] = static_cast<float>(running_var[c] * (1.0 - m) + m2_a / (n_a - 1.0) * m);
}

// One thread per channel: the splits' gradient sums in double, in split order (grad_bias = sum(ga),
// grad_weight = sum(ga * xhat)), and grad_x's coefficients k[c] = (k_ga, k_xhat, k_one).
__global__ void __launch_bounds__(kThreads)
    bn_act_merge_grad_kernel(const float* __restrict__ part, int64_t splits, int64_t channels, int64_t count,
                             const float* __restrict__ weight, const float* __restrict__ invstd, bool training,
                             float* __restrict__ sum_ga, float* __restrict__ sum_ga_xhat, float* __restrict__ k) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  double s_ga = 0.0, s_gx = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    s_ga += part[(s * channels + c) * kSlot];
    s_gx += part[(s * channels + c) * kSlot + 1];
  }
  sum_ga[c] = static_cast<float>(s_ga);
  sum_ga_xhat[c] = static_cast<float>(s_gx);
  const bn_act::Backward<float> b =
      bn_act::backward_coeffs(weight[c], invstd[c], s_ga, s_gx, static_cast<double>(count), training);
  k[c * 3] = b.k_ga;
  k[c * 3 + 1] = b.k_xhat;
  k[c * 3 + 2] = b.k_one;
}

// y = act(x * scale + shift) (+ r), one element a thread. kFromRunning: var_or_invstd holds the
// running variance (invstd = 1 / sqrt(var + eps) here), else the invstd.
template <typename scalar_t, bool kRelu6, bool kResidual, bool kFromRunning>
__global__ void __launch_bounds__(kThreads)
    bn_act_apply_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                        const float* __restrict__ weight, const float* __restrict__ bias,
                        const float* __restrict__ mean, const float* __restrict__ var_or_invstd, float eps,
                        Problem pr) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= pr.total()) return;
  const int64_t c = channel_of(pr, i);
  const float is = kFromRunning ? 1.f / sqrtf(var_or_invstd[c] + eps) : var_or_invstd[c];
  const bn_act::Affine<float> af = bn_act::affine(weight[c], bias[c], mean[c], is);
  float a = bn_act::act(fmaf(static_cast<float>(x[i]), af.scale, af.shift), kRelu6);
  if constexpr (kResidual) a += static_cast<float>(r[i]);
  y[i] = static_cast<scalar_t>(a);
}

// gx = k_ga * ga + k_xhat * xhat + k_one, one element a thread.
template <typename scalar_t, bool kRelu6>
__global__ void __launch_bounds__(kThreads)
    bn_act_grad_x_kernel(scalar_t* __restrict__ gx, const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                         const float* __restrict__ weight, const float* __restrict__ bias,
                         const float* __restrict__ mean, const float* __restrict__ invstd,
                         const float* __restrict__ k, Problem pr) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= pr.total()) return;
  const int64_t c = channel_of(pr, i);
  const float xv = static_cast<float>(x[i]), mu = mean[c], is = invstd[c];
  const bn_act::Affine<float> af = bn_act::affine(weight[c], bias[c], mu, is);
  const float ga = bn_act::act_passes(fmaf(xv, af.scale, af.shift), kRelu6) ? static_cast<float>(g[i]) : 0.f;
  const bn_act::Backward<float> b{k[c * 3], k[c * 3 + 1], k[c * 3 + 2]};
  gx[i] = static_cast<scalar_t>(bn_act::grad_x(b, ga, (xv - mu) * is));
}

}  // namespace bn_act_kernels
}  // namespace fercuda

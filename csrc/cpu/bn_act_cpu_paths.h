// BatchNorm + ReLU6 (or identity) + residual add on the CPU, split by instruction set: the op glue
// (bn_act_cpu.cpp: argument checks, allocation, the per-channel coefficients, the merges of the
// reductions' parts and the running statistics) calls the compute of one path, chosen at run time
// (cpu_isa.h). Each path is a translation unit of its own (bn_act_cpu_path_*.cpp) that compiles the
// same compute (bn_act_cpu_compute.h, the loops of bn_act_cpu_kernels.h) for its instruction set.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"

namespace fercuda {
namespace bn_act_cpu {

// Values a part of a reduction holds: small enough to stay in L1/L2 between its two sweeps.
constexpr int64_t kPartValues = 8192;
// channels_last: the least values a kernel row holds (a row of 8 channels alone is all loop
// overhead and vector tails): image rows are taken `tile` at a time.
constexpr int64_t kMinRun = 128;

// How a (N, C, H, W) tensor is cut into parts, by its shape alone (so the reductions do not depend
// on the thread count): NCHW, each plane into `chunks` runs of at most `chunk` values (part q =
// plane * chunks + k); channels_last, the N * H * W rows into runs of `chunk` rows (part q = run),
// a multiple of `tile`, the image rows a kernel row holds.
struct Layout {
  bool cl;
  int64_t n, c, hw;
  int64_t chunk, chunks, parts;
  int64_t tile;

  int64_t positions() const { return n * hw; }
  // Values of channel c in part q (every channel has the same count in a part).
  int64_t part_count(int64_t q) const {
    const int64_t k = cl ? q : q % chunks;
    const int64_t total = cl ? positions() : hw;
    return std::min(chunk, total - k * chunk);
  }
  // Slots of the parts' per-channel results: channel c of part q at q * C + c (channels_last) or
  // at q (NCHW, where a part holds one channel).
  int64_t part_slots() const { return cl ? parts * c : parts; }
};

// Per-channel values, (C,) arrays of the accumulation type T (float, or double for float64 x):
// a = x * scale + shift, xhat = (x - mean) * invstd, and the backward's grad_x = k_ga * ga + k_xhat *
// xhat + k_one (bn_act::Backward; only grad_x reads them).
template <typename T>
struct Coeffs {
  const T *mean, *invstd, *scale, *shift;
  const T *k_ga, *k_xhat, *k_one;
};

// The compute of one path for one accumulation type T: float for float32, float16 and bfloat16 x
// (the functions dispatch on x's dtype), double for float64. x, grad_out, residual, y and grad_x
// are contiguous in the layout l names; residual may be undefined.
template <typename T>
struct Kernels {
  // Training's pass 1: each part's per-channel mean and M2 (sum of squared deviations from the
  // part's mean) into slots (Layout::part_slots) of pm and pq.
  void (*part_stats)(const at::Tensor& x, const Layout& l, T* pm, T* pq);
  // y = act(x * scale + shift) + residual.
  void (*apply)(const at::Tensor& x, const at::Tensor& residual, const Layout& l, const Coeffs<T>& k, bool relu6,
                at::Tensor& y);
  // The backward's pass 1: each part's per-channel sum(ga) and sum(ga * xhat) into slots of pg and
  // pgx; ga = grad_out where the activation passes it, else 0.
  void (*part_grad_sums)(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k,
                         bool relu6, T* pg, T* pgx);
  // The backward's pass 2: grad_x.
  void (*grad_x)(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k, bool relu6,
                 at::Tensor& grad_x);
};

struct Path {
  Kernels<float> f32;
  Kernels<double> f64;

  template <typename T>
  const Kernels<T>& kernels() const {
    if constexpr (std::is_same_v<T, double>) {
      return f64;
    } else {
      return f32;
    }
  }
};

const Path& path_baseline();
const Path& path_avx2();
const Path& path_avx512();
const Path& path_avx512_bf16();

// The path of the active instruction set (cpu::active_isa()).
const Path& active_path();

// The merge, in double, of a channels_last part's lanes when its kernel rows hold `tile` > 1 image
// rows (channel c of tile row r in lane r * C + c): the whole tiles' lanes (tile_mean, tile_m2;
// `full` values each, none when full is 0), then the rest's (rest_mean; one value each, rest * C
// lanes), into the part's per-channel mean and M2 (C each). In the glue, compiled for the baseline:
// every path merges alike. sum and m2 are scratch of C doubles.
template <typename T>
void merge_tile_lanes(const Layout& l, int64_t full, int64_t rest, const T* tile_mean, const T* tile_m2,
                      const T* rest_mean, T* part_mean, T* part_m2, double* sum, double* m2);

}  // namespace bn_act_cpu
}  // namespace fercuda

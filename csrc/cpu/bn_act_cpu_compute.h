// The compute of BatchNorm + ReLU6 (or identity) + residual add on the CPU, compiled once per
// instruction-set path: a path's translation unit (bn_act_cpu_path_*.cpp) includes every library
// header first (bn_act_cpu_path_prelude.h), then this file under its `#pragma GCC target`, with
// FERCUDA_BN_ACT_PATH_FN naming its Path. Everything here has internal linkage, so each path's copy
// stays its own.
//
// The parallel loops over a tensor and the loops of bn_act_cpu_kernels.h; the reductions write
// each part's result to its slot (bn_act_cpu_paths.h, Layout), and the glue merges them per channel
// in part order, in double: the results do not depend on the thread count.
#ifndef FERCUDA_BN_ACT_PATH_FN
#error "bn_act_cpu_compute.h is included by a path's translation unit, which names its Path"
#endif

#include "bn_act_cpu_kernels.h"

namespace fercuda {
namespace bn_act_cpu {
namespace {

// Grain of parallel_for over planes / rows: about kPartValues values a task.
int64_t grain(int64_t values_per_item) { return std::max<int64_t>(1, kPartValues / std::max<int64_t>(values_per_item, 1)); }

PlaneRuns plane_runs(const Layout& l) { return {l.hw, l.chunk, l.chunks, l.c}; }

// v (C values) repeated tile times: the per-channel values of a kernel row of tile image rows.
template <typename T>
std::vector<T> tiled(const T* v, int64_t c, int64_t tile) {
  std::vector<T> out(c * tile);
  for (int64_t r = 0; r < tile; ++r) std::copy(v, v + c, out.begin() + r * c);
  return out;
}

// channels_last rows [first, first + rows) as kernel rows: f(first row, kernel rows, values a
// kernel row) for the whole tiles, then for the rest as one shorter kernel row.
template <typename F>
void for_kernel_rows(const Layout& l, int64_t first, int64_t rows, F f) {
  const int64_t full = rows / l.tile, rest = rows % l.tile;
  if (full) f(first, full, l.tile * l.c);
  if (rest) f(first + full * l.tile, int64_t{1}, rest * l.c);
}

// fn(std::true_type) for ReLU6, fn(std::false_type) for the identity.
template <typename F>
void with_act(bool relu6, F fn) {
  if (relu6) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// ---- Statistics (training pass 1) -----------------------------------------------------------

template <typename scalar_t, typename T>
void part_stats_typed(const at::Tensor& x, const Layout& l, T* pm, T* pq) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  if (l.cl) {
    at::parallel_for(0, l.parts, 1, [&](int64_t begin, int64_t end) {
      // Lanes of a kernel row (channel c of tile row r at r * C + c): the whole tiles' lanes
      // (count `full` each), then the rest's (count 1 each), merged per channel by the glue.
      const int64_t lanes = l.tile * l.c;
      std::vector<T> tile_mean(lanes), tile_m2(lanes), rest_mean(lanes), rest_m2(lanes);
      std::vector<double> sum(l.c), m2(l.c);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t first = q * l.chunk, cnt = l.part_count(q);
        const int64_t full = cnt / l.tile, rest = cnt % l.tile;
        if (l.tile == 1) {  // one lane a channel: the part's statistics as they are
          rows_mean_m2<scalar_t, T>(xd + first * l.c, cnt, l.c, pm + q * l.c, pq + q * l.c);
          continue;
        }
        if (full) rows_mean_m2<scalar_t, T>(xd + first * l.c, full, lanes, tile_mean.data(), tile_m2.data());
        if (rest) {
          rows_mean_m2<scalar_t, T>(xd + (first + full * l.tile) * l.c, 1, rest * l.c, rest_mean.data(),
                                    rest_m2.data());
        }
        merge_tile_lanes<T>(l, full, rest, tile_mean.data(), tile_m2.data(), rest_mean.data(), pm + q * l.c,
                            pq + q * l.c, sum.data(), m2.data());
      }
    });
  } else {
    at::parallel_for(0, l.parts, grain(std::min(l.hw, l.chunk)), [&](int64_t begin, int64_t end) {
      runs_mean_m2<scalar_t, T>(xd, plane_runs(l), begin, end, pm, pq);
    });
  }
}

// ---- y = act(x * scale + shift) + residual ---------------------------------------------------

template <typename scalar_t, typename T>
void apply_typed(const at::Tensor& x, const at::Tensor& residual, const Layout& l, const Coeffs<T>& k, bool relu6,
                 at::Tensor& y) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* rd = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yd = y.mutable_data_ptr<scalar_t>();
  with_act(relu6, [&](auto relu6_tag) {
    constexpr bool kRelu6 = decltype(relu6_tag)::value;
    if (l.cl) {
      const std::vector<T> scale_t = tiled(k.scale, l.c, l.tile), shift_t = tiled(k.shift, l.c, l.tile);
      at::parallel_for(0, l.positions(), grain(l.c), [&](int64_t begin, int64_t end) {
        for_kernel_rows(l, begin, end - begin, [&](int64_t first, int64_t rows, int64_t len) {
          const int64_t off = first * l.c;
          rows_apply<kRelu6, scalar_t, T>(xd + off, rd ? rd + off : nullptr, rows, len, scale_t.data(),
                                          shift_t.data(), yd + off);
        });
      });
    } else {
      at::parallel_for(0, l.n * l.c, grain(l.hw), [&](int64_t begin, int64_t end) {
        planes_apply<kRelu6, scalar_t, T>(xd, rd, l.hw, l.c, begin, end, k.scale, k.shift, yd);
      });
    }
  });
}

// ---- Backward ----------------------------------------------------------------------------------

template <typename scalar_t, typename T>
void part_grad_sums_typed(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k,
                          bool relu6, T* pg, T* pgx) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  with_act(relu6, [&](auto relu6_tag) {
    constexpr bool kRelu6 = decltype(relu6_tag)::value;
    if (l.cl) {
      const std::vector<T> mu_t = tiled(k.mean, l.c, l.tile), is_t = tiled(k.invstd, l.c, l.tile),
                           scale_t = tiled(k.scale, l.c, l.tile), shift_t = tiled(k.shift, l.c, l.tile);
      at::parallel_for(0, l.parts, 1, [&](int64_t begin, int64_t end) {
        // Lanes of a kernel row, added into the part's per-channel sums tile row by tile row
        // (with one image row a kernel row, the lanes are the part's sums).
        std::vector<T> lane_g(l.tile > 1 ? l.tile * l.c : 0), lane_gx(lane_g.size());
        for (int64_t q = begin; q < end; ++q) {
          T* const part_g = pg + q * l.c;
          T* const part_gx = pgx + q * l.c;
          if (l.tile == 1) {
            const int64_t off = q * l.chunk * l.c;
            rows_grad_sums<kRelu6, scalar_t, T>(gd + off, xd + off, l.part_count(q), l.c, mu_t.data(), is_t.data(),
                                                scale_t.data(), shift_t.data(), part_g, part_gx);
            continue;
          }
          std::fill(part_g, part_g + l.c, T(0));
          std::fill(part_gx, part_gx + l.c, T(0));
          for_kernel_rows(l, q * l.chunk, l.part_count(q), [&](int64_t first, int64_t rows, int64_t len) {
            const int64_t off = first * l.c;
            rows_grad_sums<kRelu6, scalar_t, T>(gd + off, xd + off, rows, len, mu_t.data(), is_t.data(),
                                                scale_t.data(), shift_t.data(), lane_g.data(), lane_gx.data());
            for (int64_t r = 0; r < len / l.c; ++r)
              for (int64_t c = 0; c < l.c; ++c) {
                part_g[c] += lane_g[r * l.c + c];
                part_gx[c] += lane_gx[r * l.c + c];
              }
          });
        }
      });
    } else {
      at::parallel_for(0, l.parts, grain(std::min(l.hw, l.chunk)), [&](int64_t begin, int64_t end) {
        runs_grad_sums<kRelu6, scalar_t, T>(gd, xd, plane_runs(l), begin, end, k.mean, k.invstd, k.scale, k.shift,
                                            pg, pgx);
      });
    }
  });
}

template <typename scalar_t, typename T>
void grad_x_typed(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k, bool relu6,
                  at::Tensor& grad_x) {
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* gd = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gxd = grad_x.mutable_data_ptr<scalar_t>();
  with_act(relu6, [&](auto relu6_tag) {
    constexpr bool kRelu6 = decltype(relu6_tag)::value;
    if (l.cl) {
      const std::vector<T> mu_t = tiled(k.mean, l.c, l.tile), is_t = tiled(k.invstd, l.c, l.tile),
                           scale_t = tiled(k.scale, l.c, l.tile), shift_t = tiled(k.shift, l.c, l.tile),
                           k_ga_t = tiled(k.k_ga, l.c, l.tile), k_xhat_t = tiled(k.k_xhat, l.c, l.tile),
                           k_one_t = tiled(k.k_one, l.c, l.tile);
      at::parallel_for(0, l.positions(), grain(l.c), [&](int64_t begin, int64_t end) {
        for_kernel_rows(l, begin, end - begin, [&](int64_t first, int64_t rows, int64_t len) {
          const int64_t off = first * l.c;
          rows_grad_x<kRelu6, scalar_t, T>(gd + off, xd + off, rows, len, mu_t.data(), is_t.data(), scale_t.data(),
                                           shift_t.data(), k_ga_t.data(), k_xhat_t.data(), k_one_t.data(),
                                           gxd + off);
        });
      });
    } else {
      std::vector<bn_act::Backward<T>> kb(l.c);
      for (int64_t c = 0; c < l.c; ++c) kb[c] = {k.k_ga[c], k.k_xhat[c], k.k_one[c]};
      at::parallel_for(0, l.n * l.c, grain(l.hw), [&](int64_t begin, int64_t end) {
        planes_grad_x<kRelu6, scalar_t, T>(gd, xd, l.hw, l.c, begin, end, k.mean, k.invstd, k.scale, k.shift,
                                           kb.data(), gxd);
      });
    }
  });
}

// ---- The path's entry points: x's dtype to its storage type ------------------------------------

// fn(scalar_t{}) for x's storage type among those of accumulation type T.
template <typename T, typename F>
void dispatch(const at::Tensor& x, F fn) {
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "batch_norm_act: float64 kernels given ", x.scalar_type());
    fn(double{});
  } else {
    switch (x.scalar_type()) {
      case at::kFloat:
        return fn(float{});
      case at::kHalf:
        return fn(c10::Half{});
      case at::kBFloat16:
        return fn(c10::BFloat16{});
      default:
        TORCH_CHECK(false, "batch_norm_act: float kernels given ", x.scalar_type());
    }
  }
}

template <typename T>
void part_stats(const at::Tensor& x, const Layout& l, T* pm, T* pq) {
  dispatch<T>(x, [&](auto s) { part_stats_typed<decltype(s), T>(x, l, pm, pq); });
}

template <typename T>
void apply(const at::Tensor& x, const at::Tensor& residual, const Layout& l, const Coeffs<T>& k, bool relu6,
           at::Tensor& y) {
  dispatch<T>(x, [&](auto s) { apply_typed<decltype(s), T>(x, residual, l, k, relu6, y); });
}

template <typename T>
void part_grad_sums(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k, bool relu6,
                    T* pg, T* pgx) {
  dispatch<T>(x, [&](auto s) { part_grad_sums_typed<decltype(s), T>(grad_out, x, l, k, relu6, pg, pgx); });
}

template <typename T>
void grad_x(const at::Tensor& grad_out, const at::Tensor& x, const Layout& l, const Coeffs<T>& k, bool relu6,
            at::Tensor& gx) {
  dispatch<T>(x, [&](auto s) { grad_x_typed<decltype(s), T>(grad_out, x, l, k, relu6, gx); });
}

template <typename T>
constexpr Kernels<T> kernels_of() {
  return {&part_stats<T>, &apply<T>, &part_grad_sums<T>, &grad_x<T>};
}

}  // namespace

const Path& FERCUDA_BN_ACT_PATH_FN() {
  static const Path path{kernels_of<float>(), kernels_of<double>()};
  return path;
}

}  // namespace bn_act_cpu
}  // namespace fercuda

// CPU kernels of the Canny family.
//
// Every op streams rows: a pixel row of the output needs only a few rows of each
// intermediate (blurred image, Sobel gradients, magnitudes), kept in rolling buffers of
// thread-local scratch. The fused canny therefore never materialises a full-size
// intermediate: non-maximum suppression writes its labels (0, 1, 2) straight into the
// output, and hysteresis turns them into 0 / 255 in place.
//
// Parallelism: batches of small images run one image per task; a large image is cut into
// row bands that recompute their few halo rows. Hysteresis then runs serially, or, from
// kParallelHysteresisPixels on, per band with a serial fix-up across band seams.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fercuda/canny_math.h"
#include "fercuda/checks.h"

#define FERCUDA_INLINE inline __attribute__((always_inline))

namespace fercuda {
namespace {

using namespace canny;

// ---- Thread-local scratch ------------------------------------------------------

// Rows of intermediates, carved from one thread-local buffer that only grows.
class Scratch {
 public:
  explicit Scratch(size_t bytes) {
    thread_local std::vector<unsigned char> arena;
    if (arena.size() < bytes + 64) arena.resize(bytes + 64);
    base_ = arena.data();
    offset_ = (64 - reinterpret_cast<uintptr_t>(base_) % 64) % 64;
  }
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base_ + offset_);
    offset_ += round_up(count * static_cast<int64_t>(sizeof(T)));
    return p;
  }
  static int64_t round_up(int64_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  unsigned char* base_;
  int64_t offset_;
};

// ---- Row kernels ------------------------------------------------------------

// One row of cv2.GaussianBlur(ksize=K, sigma 0) on uint8: vertical taps over the K source
// rows, reflect-101 columns, horizontal taps, one rounding. The vertical sums fit uint16
// (255 * 64); the 2-D sums fit uint16 for K <= 5, so those run on 16-bit lanes.
template <int K>
FERCUDA_INLINE void blur_row_body(const uint8_t* const* src, int64_t w, uint16_t* vsum, uint8_t* out) {
  constexpr int pad = K / 2;
  uint16_t* v = vsum + pad;
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) {
    unsigned acc = 0;
    for (int t = 0; t < K; ++t) acc += static_cast<unsigned>(gaussian_tap(K, t)) * src[t][c];
    v[c] = static_cast<uint16_t>(acc);
  }
  for (int j = 1; j <= pad; ++j) {
    v[-j] = v[reflect101(-j, static_cast<int>(w))];
    v[w - 1 + j] = v[reflect101(static_cast<int>(w - 1 + j), static_cast<int>(w))];
  }
  using Acc = std::conditional_t<(K <= 5), uint16_t, uint32_t>;
  const Acc half = static_cast<Acc>(1u << (gaussian_shift(K) - 1));
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) {
    Acc acc = half;
    for (int t = 0; t < K; ++t) acc += static_cast<Acc>(gaussian_tap(K, t)) * static_cast<Acc>(vsum[c + t]);
    out[c] = static_cast<uint8_t>(acc >> gaussian_shift(K));
  }
}

FERCUDA_SIMD void blur_row3(const uint8_t* const* src, int64_t w, uint16_t* vsum, uint8_t* out) {
  blur_row_body<3>(src, w, vsum, out);
}
FERCUDA_SIMD void blur_row5(const uint8_t* const* src, int64_t w, uint16_t* vsum, uint8_t* out) {
  blur_row_body<5>(src, w, vsum, out);
}
FERCUDA_SIMD void blur_row7(const uint8_t* const* src, int64_t w, uint16_t* vsum, uint8_t* out) {
  blur_row_body<7>(src, w, vsum, out);
}

// Sobel aperture 3 with a replicate border for row g, from source rows a0 = g-1, a1 = g,
// a2 = g+1 (already clamped). vs / vd hold the vertical smoothing / difference with one
// replicated column on each side (width w + 2).
FERCUDA_SIMD void sobel_row(const uint8_t* a0, const uint8_t* a1, const uint8_t* a2, int64_t w, int16_t* vs,
                           int16_t* vd, int16_t* dx, int16_t* dy) {
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) {
    vs[c + 1] = static_cast<int16_t>(a0[c] + 2 * a1[c] + a2[c]);
    vd[c + 1] = static_cast<int16_t>(a2[c] - a0[c]);
  }
  vs[0] = vs[1];
  vd[0] = vd[1];
  vs[w + 1] = vs[w];
  vd[w + 1] = vd[w];
  // sobel_dx / sobel_dy of canny_math.h, factored through the separable sums above.
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) {
    dx[c] = static_cast<int16_t>(vs[c + 2] - vs[c]);
    dy[c] = static_cast<int16_t>(vd[c] + 2 * vd[c + 1] + vd[c + 2]);
  }
}

// The paper's doubled differences for row r from rows b0 = r and b1 = r + 1 (clamped), the
// column beyond the last replicated: dx = 2P, dy = -2Q (rows grow downward).
FERCUDA_SIMD void paper_row(const uint8_t* b0, const uint8_t* b1, int64_t w, int16_t* dx, int16_t* dy) {
#pragma GCC ivdep
  for (int64_t c = 0; c + 1 < w; ++c) {
    dx[c] = static_cast<int16_t>(paper_p2(b0[c], b0[c + 1], b1[c], b1[c + 1]));
    dy[c] = static_cast<int16_t>(-paper_q2(b0[c], b0[c + 1], b1[c], b1[c + 1]));
  }
  const int64_t c = w - 1;
  dx[c] = static_cast<int16_t>(paper_p2(b0[c], b0[c], b1[c], b1[c]));
  dy[c] = static_cast<int16_t>(-paper_q2(b0[c], b0[c], b1[c], b1[c]));
}

// Magnitudes with a zero column on each side (width w + 2): outside the image m = 0.
FERCUDA_SIMD void magnitude_row(const int16_t* dx, const int16_t* dy, int64_t w, bool l2, int32_t* mag) {
  mag[0] = 0;
  mag[w + 1] = 0;
  if (l2) {
#pragma GCC ivdep
    for (int64_t c = 0; c < w; ++c) mag[c + 1] = magnitude(dx[c], dy[c], true);
  } else {
    // magnitude_at: the columns cv2 handles 8 at a time use a 16-bit |v|.
    const int64_t grouped = w / kCvMagnitudeLanes * kCvMagnitudeLanes;
#pragma GCC ivdep
    for (int64_t c = 0; c < grouped; ++c) mag[c + 1] = abs_int16_wrapped(dx[c]) + abs_int16_wrapped(dy[c]);
    for (int64_t c = grouped; c < w; ++c) mag[c + 1] = magnitude(dx[c], dy[c], false);
  }
}

// Non-maximum suppression and double threshold of one row: mu, mc, md are the magnitudes of
// the rows above, at and below (padded, zeros outside the image). Branch-free so it runs
// on vector lanes: every neighbour test is computed and the sector selects one.
FERCUDA_SIMD void nms_row(const int16_t* dx, const int16_t* dy, const int32_t* mu, const int32_t* mc,
                         const int32_t* md, int64_t w, int low, int high, uint8_t* out) {
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) {
    const int m = mc[c + 1];
    const int sector = gradient_sector(dx[c], dy[c]);
    const bool opposite = diagonal_step(dx[c], dy[c]) < 0;
    const int diag_before = opposite ? mu[c + 2] : mu[c];
    const int diag_after = opposite ? md[c] : md[c + 2];
    // nms_label of canny_math.h, with `&` for `&&` so no test branches.
    const int keep_h = (m > mc[c]) & (m >= mc[c + 2]);
    const int keep_v = (m > mu[c + 1]) & (m >= md[c + 1]);
    const int keep_d = (m > diag_before) & (m > diag_after);
    const int keep = sector == kHorizontal ? keep_h : (sector == kVertical ? keep_v : keep_d);
    out[c] = static_cast<uint8_t>((keep & (m > low)) * (1 + (m > high)));
  }
}

// After hysteresis: 255 for strong pixels and the weak ones reached, 0 elsewhere.
FERCUDA_SIMD void finish_row(uint8_t* row, int64_t w) {
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) row[c] = row[c] >= kStrong ? 255 : 0;
}

// ---- Hysteresis ---------------------------------------------------------------

constexpr uint8_t kEdge = 255;

struct Pixel {
  int32_t r, c;
};

// Marks as kEdge the weak neighbours of (r, c) within rows [r0, r1) and pushes them.
FERCUDA_INLINE void grow_from(uint8_t* map, int64_t w, int64_t r0, int64_t r1, int64_t r, int64_t c,
                              std::vector<Pixel>& stack) {
  uint8_t* p = map + r * w + c;
  if (r > r0 && r + 1 < r1 && c > 0 && c + 1 < w) {
    // Interior: the eight neighbours at fixed offsets, no bounds to test. Their weak tests
    // are gathered into a bit mask first, so only the neighbours found cost a branch.
    constexpr int kDr[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
    constexpr int kDc[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
    const uint8_t* up = p - w;
    const uint8_t* down = p + w;
    unsigned found = (up[-1] == kWeak) | (up[0] == kWeak) << 1 | (up[1] == kWeak) << 2 | (p[-1] == kWeak) << 3 |
                     (p[1] == kWeak) << 4 | (down[-1] == kWeak) << 5 | (down[0] == kWeak) << 6 |
                     (down[1] == kWeak) << 7;
    while (found) {
      const int k = __builtin_ctz(found);
      found &= found - 1;
      p[kDr[k] * w + kDc[k]] = kEdge;
      stack.push_back({static_cast<int32_t>(r + kDr[k]), static_cast<int32_t>(c + kDc[k])});
    }
    return;
  }
  const int64_t ra = std::max<int64_t>(r - 1, r0), rb = std::min<int64_t>(r + 1, r1 - 1);
  const int64_t ca = std::max<int64_t>(c - 1, 0), cb = std::min<int64_t>(c + 1, w - 1);
  for (int64_t i = ra; i <= rb; ++i) {
    uint8_t* row = map + i * w;
    for (int64_t j = ca; j <= cb; ++j) {
      if (row[j] == kWeak) {
        row[j] = kEdge;
        stack.push_back({static_cast<int32_t>(i), static_cast<int32_t>(j)});
      }
    }
  }
}

// Marks as kEdge every weak pixel 8-connected through weak pixels to one on the stack,
// within rows [r0, r1).
void flood(uint8_t* map, int64_t w, int64_t r0, int64_t r1, std::vector<Pixel>& stack) {
  while (!stack.empty()) {
    const Pixel p = stack.back();
    stack.pop_back();
    grow_from(map, w, r0, r1, p.r, p.c, stack);
  }
}

// 1 where a pixel or one of its left and right neighbours is strong: three of these rows
// (above, at, below) tell which weak pixels touch a strong one, the seeds of hysteresis.
FERCUDA_SIMD void strong_dilated_row(const uint8_t* row, int64_t w, uint8_t* dilated) {
  auto strong = [](uint8_t v) { return static_cast<uint8_t>(v == kStrong); };
#pragma GCC ivdep
  for (int64_t c = 1; c + 1 < w; ++c) dilated[c] = strong(row[c - 1]) | strong(row[c]) | strong(row[c + 1]);
  dilated[0] = strong(row[0]) | (w > 1 ? strong(row[1]) : 0);
  if (w > 1) dilated[w - 1] = strong(row[w - 2]) | strong(row[w - 1]);
}

FERCUDA_SIMD void seeds_row(const uint8_t* row, const uint8_t* up, const uint8_t* at, const uint8_t* down, int64_t w,
                           uint8_t* flags) {
#pragma GCC ivdep
  for (int64_t c = 0; c < w; ++c) flags[c] = static_cast<uint8_t>(row[c] == kWeak) & (up[c] | at[c] | down[c]);
}

// Hysteresis over rows [r0, r1) of a label map of h rows: every weak pixel connected to a
// strong one through weak pixels of these rows becomes kEdge. Strong pixels stay kStrong
// (finish_row turns them into edges), so the seed test may read rows of other bands.
void hysteresis_rows(uint8_t* map, int64_t h, int64_t w, int64_t r0, int64_t r1) {
  thread_local std::vector<Pixel> stack;
  thread_local std::vector<uint8_t> buffers;
  buffers.assign(5 * w, 0);
  const uint8_t* zeros = buffers.data();
  uint8_t* flags = buffers.data() + w;
  uint8_t* dilated[3] = {buffers.data() + 2 * w, buffers.data() + 3 * w, buffers.data() + 4 * w};
  // dilated[r % 3] holds row r's mask; rows beyond the image read `zeros`.
  auto mask = [&](int64_t r) -> const uint8_t* { return (r < 0 || r >= h) ? zeros : dilated[r % 3]; };
  if (r0 > 0) strong_dilated_row(map + (r0 - 1) * w, w, dilated[(r0 - 1) % 3]);
  strong_dilated_row(map + r0 * w, w, dilated[r0 % 3]);
  for (int64_t r = r0; r < r1; ++r) {
    uint8_t* row = map + r * w;
    if (r + 1 < h) strong_dilated_row(row + w, w, dilated[(r + 1) % 3]);
    seeds_row(row, mask(r - 1), mask(r), mask(r + 1), w, flags);
    int64_t c = 0;
    while (c < w) {
      // Seeds are rare: skip eight flags at a time.
      if (c + 8 <= w) {
        uint64_t v;
        std::memcpy(&v, flags + c, 8);
        if (v == 0) {
          c += 8;
          continue;
        }
      }
      const int64_t end = std::min<int64_t>(c + 8, w);
      for (; c < end; ++c) {
        if (flags[c] && row[c] == kWeak) {
          row[c] = kEdge;
          grow_from(map, w, r0, r1, r, c, stack);
          flood(map, w, r0, r1, stack);
        }
      }
    }
  }
}

// Calls fn(begin, end) over [0, count) in chunks of `chunk` on torch's intra-op threads.
// Chunks are handed out one at a time from a shared counter rather than in one fixed share
// per thread, so a thread the OS delays (a busy machine) holds up one chunk, not its share.
template <typename Fn>
void parallel_chunks(int64_t count, int64_t chunk, const Fn& fn) {
  if (count <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t chunks = (count + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, count);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < chunks; k = next.fetch_add(1))
      fn(k * chunk, std::min(count, (k + 1) * chunk));
  });
}

// Row bands of one image: several per thread (see parallel_chunks), each at least
// min_rows tall.
std::vector<int64_t> band_starts(int64_t h, int64_t min_rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t bands = std::min<int64_t>(threads * 8, std::max<int64_t>(1, h / min_rows));
  if (threads == 1) bands = 1;
  std::vector<int64_t> starts;
  for (int64_t b = 0; b <= bands; ++b) starts.push_back(h * b / bands);
  return starts;
}

// Hysteresis of a whole label map, in parallel over bands: each band grows within itself,
// then growth across the seams continues serially from the edge pixels beside each seam.
void hysteresis_image(uint8_t* map, int64_t h, int64_t w, bool parallel) {
  const std::vector<int64_t> starts = parallel ? band_starts(h, 64) : std::vector<int64_t>{0, h};
  const int64_t bands = static_cast<int64_t>(starts.size()) - 1;
  if (bands == 1) {
    hysteresis_rows(map, h, w, 0, h);
  } else {
    parallel_chunks(bands, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) hysteresis_rows(map, h, w, starts[b], starts[b + 1]);
    });
    std::vector<Pixel> stack;
    for (int64_t b = 1; b < bands; ++b) {
      for (int64_t r = starts[b] - 1; r <= starts[b]; ++r) {
        const uint8_t* row = map + r * w;
        for (int64_t c = 0; c < w; ++c)
          if (row[c] == kEdge) stack.push_back({static_cast<int32_t>(r), static_cast<int32_t>(c)});
      }
    }
    flood(map, w, 0, h, stack);
  }
  auto finish = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) finish_row(map + r * w, w);
  };
  if (parallel)
    parallel_chunks(h, std::max<int64_t>(1, 65536 / std::max<int64_t>(w, 1)), finish);
  else
    finish(0, h);
}

// ---- Row pipelines ------------------------------------------------------------

// Blurred rows on demand, three kept (Sobel needs rows g-1..g+1, the paper gradient g..g+1).
class BlurredRows {
 public:
  BlurredRows(const uint8_t* src, int64_t h, int64_t w, int ksize, Scratch& s) : src_(src), h_(h), w_(w), k_(ksize) {
    if (k_ != 0) {
      for (auto& slot : slots_) slot = s.take<uint8_t>(w);
      vsum_ = s.take<uint16_t>(w + 6);
    }
  }
  static int64_t scratch_bytes(int64_t w) {
    return 3 * Scratch::round_up(w) + Scratch::round_up((w + 6) * 2);
  }
  // Row b (0 <= b < h) of the blurred image; valid until three other rows were asked for.
  const uint8_t* get(int64_t b) {
    if (k_ == 0) return src_ + b * w_;
    const int s = static_cast<int>(b % 3);
    if (tags_[s] != b) {
      const uint8_t* rows[7];
      const int pad = k_ / 2;
      const bool interior = b >= pad && b + pad < h_;
      for (int t = 0; t < k_; ++t)
        rows[t] = src_ + (interior ? b + t - pad : reflect101(static_cast<int>(b + t - pad), static_cast<int>(h_))) * w_;
      if (k_ == 3) blur_row3(rows, w_, vsum_, slots_[s]);
      else if (k_ == 5) blur_row5(rows, w_, vsum_, slots_[s]);
      else blur_row7(rows, w_, vsum_, slots_[s]);
      tags_[s] = b;
    }
    return slots_[s];
  }

 private:
  const uint8_t* src_;
  int64_t h_, w_;
  int k_;
  uint8_t* slots_[3] = {};
  int64_t tags_[3] = {-1, -1, -1};
  uint16_t* vsum_ = nullptr;
};

enum class Gradient { kSobel, kPaper };

// Gradients and magnitudes of rows on demand, three kept (NMS needs g-1..g+1).
class GradientRows {
 public:
  GradientRows(BlurredRows& blurred, int64_t h, int64_t w, Gradient kind, bool l2, Scratch& s)
      : blurred_(blurred), h_(h), w_(w), kind_(kind), l2_(l2) {
    for (int i = 0; i < 3; ++i) {
      dx_[i] = s.take<int16_t>(w);
      dy_[i] = s.take<int16_t>(w);
      mag_[i] = s.take<int32_t>(w + 2);
    }
    vs_ = s.take<int16_t>(w + 2);
    vd_ = s.take<int16_t>(w + 2);
  }
  static int64_t scratch_bytes(int64_t w) {
    return 3 * (2 * Scratch::round_up(w * 2) + Scratch::round_up((w + 2) * 4)) + 2 * Scratch::round_up((w + 2) * 2);
  }
  int slot(int64_t g) {
    const int s = static_cast<int>(g % 3);
    if (tags_[s] != g) {
      if (kind_ == Gradient::kSobel) {
        const uint8_t* a0 = blurred_.get(std::max<int64_t>(g - 1, 0));
        const uint8_t* a1 = blurred_.get(g);
        const uint8_t* a2 = blurred_.get(std::min<int64_t>(g + 1, h_ - 1));
        sobel_row(a0, a1, a2, w_, vs_, vd_, dx_[s], dy_[s]);
      } else {
        const uint8_t* b0 = blurred_.get(g);
        const uint8_t* b1 = blurred_.get(std::min<int64_t>(g + 1, h_ - 1));
        paper_row(b0, b1, w_, dx_[s], dy_[s]);
      }
      magnitude_row(dx_[s], dy_[s], w_, l2_, mag_[s]);
      tags_[s] = g;
    }
    return s;
  }
  const int16_t* dx(int s) const { return dx_[s]; }
  const int16_t* dy(int s) const { return dy_[s]; }
  const int32_t* mag(int s) const { return mag_[s]; }

 private:
  BlurredRows& blurred_;
  int64_t h_, w_;
  Gradient kind_;
  bool l2_;
  int16_t* dx_[3];
  int16_t* dy_[3];
  int32_t* mag_[3];
  int16_t* vs_;
  int16_t* vd_;
  int64_t tags_[3] = {-1, -1, -1};
};

// NMS labels of rows [r0, r1), from magnitudes supplied by `rows` (GradientRows or the
// given-gradient variant below), written into `labels` (the image's full map).
template <typename Rows>
void nms_rows(Rows& rows, int64_t h, int64_t w, const int32_t* zero_mag, Thresholds th, int64_t r0, int64_t r1,
              uint8_t* labels) {
  for (int64_t r = r0; r < r1; ++r) {
    // Ask for rows in increasing order: the blurred-row ring depends on it.
    const int32_t* mu = r > 0 ? rows.mag(rows.slot(r - 1)) : zero_mag;
    const int s = rows.slot(r);
    const int32_t* md = r + 1 < h ? rows.mag(rows.slot(r + 1)) : zero_mag;
    nms_row(rows.dx(s), rows.dy(s), mu, rows.mag(s), md, w, th.low, th.high, labels + r * w);
  }
}

// Magnitudes of given (dx, dy) rows, three kept.
class GivenGradientRows {
 public:
  GivenGradientRows(const int16_t* dx, const int16_t* dy, int64_t w, bool l2, Scratch& s)
      : dx_(dx), dy_(dy), w_(w), l2_(l2) {
    for (auto& m : mag_) m = s.take<int32_t>(w + 2);
  }
  static int64_t scratch_bytes(int64_t w) { return 3 * Scratch::round_up((w + 2) * 4); }
  int slot(int64_t g) {
    const int s = static_cast<int>(g % 3);
    if (tags_[s] != g) {
      magnitude_row(dx_ + g * w_, dy_ + g * w_, w_, l2_, mag_[s]);
      tags_[s] = g;
      rows_[s] = g;
    }
    return s;
  }
  const int16_t* dx(int s) const { return dx_ + rows_[s] * w_; }
  const int16_t* dy(int s) const { return dy_ + rows_[s] * w_; }
  const int32_t* mag(int s) const { return mag_[s]; }

 private:
  const int16_t* dx_;
  const int16_t* dy_;
  int64_t w_;
  bool l2_;
  int32_t* mag_[3];
  int64_t rows_[3] = {0, 0, 0};
  int64_t tags_[3] = {-1, -1, -1};
};

// ---- Scheduling -----------------------------------------------------------------

// Images at most this large run whole, one per task; larger ones are split into row bands.
constexpr int64_t kSmallImagePixels = 256 * 256;

// Hysteresis runs in parallel row bands only from this size on. Every parallel region ends
// in a barrier, and on a machine whose cores are busy with other work a barrier can wait a
// whole scheduler slice for a preempted thread (measured at 1920x1080 with 2 threads on a
// loaded 2-core machine: 36 ms with banded hysteresis, 12 ms with serial, against 2.2 ms and
// about 2.6 ms when idle). Serial hysteresis over 2 Mpixels costs ~1.5 ms; at 4096x4096 it
// would dominate.
constexpr int64_t kParallelHysteresisPixels = 4000000;

// Calls band(n, r0, r1) over every row of an (n, h, w) batch: whole images per task when
// they are small or numerous, row bands of each image otherwise.
template <typename Band>
void for_each_band(int64_t n, int64_t h, int64_t w, const Band& band) {
  const int64_t threads = at::get_num_threads();
  if (h * w <= kSmallImagePixels || n >= 2 * threads) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * w));
    parallel_chunks(n, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) band(i, 0, h);
    });
    return;
  }
  const std::vector<int64_t> starts = band_starts(h, 16);
  const int64_t bands = static_cast<int64_t>(starts.size()) - 1;
  parallel_chunks(n * bands, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) band(b / bands, starts[b % bands], starts[b % bands + 1]);
  });
}

bool is_empty(const at::Tensor& batch) { return batch.numel() == 0; }

// ---- Ops ------------------------------------------------------------------------

at::Tensor gaussian_blur_cpu(const at::Tensor& img, int64_t ksize) {
  const at::Tensor src = as_image_batch(img, at::kByte, "gaussian_blur", "img");
  check_gaussian_ksize(ksize, "gaussian_blur", false);
  at::Tensor out = at::empty(img.sizes(), img.options().memory_format(at::MemoryFormat::Contiguous));
  if (is_empty(src)) return out;
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2);
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for_each_band(n, h, w, [&](int64_t i, int64_t r0, int64_t r1) {
    Scratch s(BlurredRows::scratch_bytes(w));
    BlurredRows rows(in + i * h * w, h, w, static_cast<int>(ksize), s);
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + (i * h + r) * w, rows.get(r), w);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sobel_cpu(const at::Tensor& img) {
  const at::Tensor src = as_image_batch(img, at::kByte, "sobel", "img");
  const auto opts = img.options().dtype(at::kShort).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(img.sizes(), opts), dy = at::empty(img.sizes(), opts);
  if (is_empty(src)) return std::make_tuple(dx, dy);
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2);
  const uint8_t* in = src.data_ptr<uint8_t>();
  int16_t* dxp = dx.data_ptr<int16_t>();
  int16_t* dyp = dy.data_ptr<int16_t>();
  for_each_band(n, h, w, [&](int64_t i, int64_t r0, int64_t r1) {
    Scratch s(2 * Scratch::round_up((w + 2) * 2));
    int16_t* vs = s.take<int16_t>(w + 2);
    int16_t* vd = s.take<int16_t>(w + 2);
    const uint8_t* im = in + i * h * w;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = (i * h + r) * w;
      sobel_row(im + std::max<int64_t>(r - 1, 0) * w, im + r * w, im + std::min<int64_t>(r + 1, h - 1) * w, w, vs,
                vd, dxp + o, dyp + o);
    }
  });
  return std::make_tuple(dx, dy);
}

std::tuple<at::Tensor, at::Tensor> paper_gradient_cpu(const at::Tensor& img) {
  const at::Tensor src = as_image_batch(img, at::kByte, "paper_gradient", "img");
  const auto opts = img.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor p = at::empty(img.sizes(), opts), q = at::empty(img.sizes(), opts);
  if (is_empty(src)) return std::make_tuple(p, q);
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2);
  const uint8_t* in = src.data_ptr<uint8_t>();
  float* pp = p.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  for_each_band(n, h, w, [&](int64_t i, int64_t r0, int64_t r1) {
    Scratch s(2 * Scratch::round_up(w * 2));
    int16_t* dx = s.take<int16_t>(w);
    int16_t* dy = s.take<int16_t>(w);
    const uint8_t* im = in + i * h * w;
    for (int64_t r = r0; r < r1; ++r) {
      paper_row(im + r * w, im + std::min<int64_t>(r + 1, h - 1) * w, w, dx, dy);
      const int64_t o = (i * h + r) * w;
      // P = 2P / 2; Q = -(dy) / 2, both exact in float32.
      for (int64_t c = 0; c < w; ++c) {
        pp[o + c] = 0.5f * static_cast<float>(dx[c]);
        qp[o + c] = -0.5f * static_cast<float>(dy[c]);
      }
    }
  });
  return std::make_tuple(p, q);
}

at::Tensor nms_cpu(const at::Tensor& dx_in, const at::Tensor& dy_in, double low, double high, bool l2_gradient) {
  check_same_shape(dx_in, "dx", dy_in, "dy", "nms");
  const at::Tensor dx = as_image_batch(dx_in, at::kShort, "nms", "dx");
  const at::Tensor dy = as_image_batch(dy_in, at::kShort, "nms", "dy");
  check_threshold(low, "nms", "low");
  check_threshold(high, "nms", "high");
  at::Tensor out = at::empty(dx_in.sizes(), dx_in.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
  if (is_empty(dx)) return out;
  const Thresholds th = canny_thresholds(low, high, l2_gradient);
  const int64_t n = dx.size(0), h = dx.size(1), w = dx.size(2);
  const int16_t* dxp = dx.data_ptr<int16_t>();
  const int16_t* dyp = dy.data_ptr<int16_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for_each_band(n, h, w, [&](int64_t i, int64_t r0, int64_t r1) {
    Scratch s(GivenGradientRows::scratch_bytes(w) + Scratch::round_up((w + 2) * 4));
    GivenGradientRows rows(dxp + i * h * w, dyp + i * h * w, w, l2_gradient, s);
    int32_t* zero = s.take<int32_t>(w + 2);
    std::fill(zero, zero + w + 2, 0);
    nms_rows(rows, h, w, zero, th, r0, r1, dst + i * h * w);
  });
  return out;
}

at::Tensor hysteresis_cpu(const at::Tensor& edge_map) {
  const at::Tensor src = as_image_batch(edge_map, at::kByte, "hysteresis", "edge_map");
  at::Tensor out = at::empty(edge_map.sizes(), edge_map.options().memory_format(at::MemoryFormat::Contiguous));
  if (is_empty(src)) return out;
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2);
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  // Only the labels 1 and 2 mean something; anything else is not an edge.
  parallel_chunks(n * h * w, 1 << 16, [&](int64_t a, int64_t b) {
    for (int64_t k = a; k < b; ++k) dst[k] = (in[k] == kWeak || in[k] == kStrong) ? in[k] : kNotEdge;
  });
  const int64_t threads = at::get_num_threads();
  if (h * w <= kSmallImagePixels || n >= 2 * threads) {
    parallel_chunks(n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, h * w)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) hysteresis_image(dst + i * h * w, h, w, false);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) hysteresis_image(dst + i * h * w, h, w, h * w >= kParallelHysteresisPixels);
  }
  return out;
}

at::Tensor canny_cpu(const at::Tensor& img, double low, double high, int64_t ksize, bool l2_gradient,
                     c10::string_view gradient) {
  const at::Tensor src = as_image_batch(img, at::kByte, "canny", "img");
  check_threshold(low, "canny", "low");
  check_threshold(high, "canny", "high");
  check_gaussian_ksize(ksize, "canny", true);
  const std::string gradient_kind(gradient);
  check_gradient_kind(gradient_kind, "canny");
  const Gradient kind = gradient_kind == "paper" ? Gradient::kPaper : Gradient::kSobel;
  at::Tensor out = at::empty(img.sizes(), img.options().memory_format(at::MemoryFormat::Contiguous));
  if (is_empty(src)) return out;
  // The paper's differences are half of dx, dy; doubling the thresholds keeps their meaning.
  const Thresholds th = kind == Gradient::kPaper ? canny_thresholds(2 * low, 2 * high, l2_gradient)
                                                 : canny_thresholds(low, high, l2_gradient);
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2);
  const uint8_t* in = src.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int k = static_cast<int>(ksize);
  const int64_t scratch = BlurredRows::scratch_bytes(w) + GradientRows::scratch_bytes(w) + Scratch::round_up((w + 2) * 4);

  auto labels = [&](int64_t i, int64_t r0, int64_t r1) {
    Scratch s(scratch);
    BlurredRows blurred(in + i * h * w, h, w, k, s);
    GradientRows rows(blurred, h, w, kind, l2_gradient, s);
    int32_t* zero = s.take<int32_t>(w + 2);
    std::fill(zero, zero + w + 2, 0);
    // A band starts its rings a few rows early (the halo) through the ordered requests in nms_rows.
    nms_rows(rows, h, w, zero, th, r0, r1, dst + i * h * w);
  };

  const int64_t threads = at::get_num_threads();
  if (h * w <= kSmallImagePixels || n >= 2 * threads) {
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, h * w));
    parallel_chunks(n, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        labels(i, 0, h);
        hysteresis_image(dst + i * h * w, h, w, false);
      }
    });
    return out;
  }
  const std::vector<int64_t> starts = band_starts(h, 16);
  const int64_t bands = static_cast<int64_t>(starts.size()) - 1;
  for (int64_t i = 0; i < n; ++i) {
    parallel_chunks(bands, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) labels(i, starts[b], starts[b + 1]);
    });
    hysteresis_image(dst + i * h * w, h, w, h * w >= kParallelHysteresisPixels);
  }
  return out;
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CPU, m) {
  m.impl("gaussian_blur", &fercuda::gaussian_blur_cpu);
  m.impl("sobel", &fercuda::sobel_cpu);
  m.impl("paper_gradient", &fercuda::paper_gradient_cpu);
  m.impl("nms", &fercuda::nms_cpu);
  m.impl("hysteresis", &fercuda::hysteresis_cpu);
  m.impl("canny", &fercuda::canny_cpu);
}

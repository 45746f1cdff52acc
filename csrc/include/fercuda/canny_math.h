// Per-pixel arithmetic of Canny, written once for the CPU and the CUDA kernels.
//
// Every function reproduces OpenCV's integer arithmetic exactly (modules/imgproc
// canny.cpp and the 8-bit fixed-point GaussianBlur), so the CPU tests that compare
// against cv2 also cover what the GPU computes.
#pragma once

#include <cmath>
#include <cstdint>

#include "fercuda/hd.h"

namespace fercuda {
namespace canny {

// ---- Borders -----------------------------------------------------------------

// Reflect-101 (gfedcb|abcdefgh|gfedcba), cv2's default border, for any offset and any
// n >= 1, including images narrower than the kernel.
FERCUDA_HD int reflect101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// Replicate (aaa|abcdefgh|hhh): the border of Canny's internal Sobel.
FERCUDA_HD int replicate(int i, int n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// ---- Gaussian blur, sigma 0, 8-bit fixed point ------------------------------
// cv2 uses the fixed tables below for ksize <= 7 and sigma 0. Their sums are powers
// of two, so the separable integer sum with one rounding at the end is exact.

FERCUDA_HD bool gaussian_ksize_supported(int ksize) { return ksize == 3 || ksize == 5 || ksize == 7; }

// Tap t (0 <= t < ksize) of the 1-D kernel, scaled to integers.
FERCUDA_HD int gaussian_tap(int ksize, int t) {
  switch (ksize) {
    case 3: return t == 1 ? 2 : 1;                                    // [1 2 1] / 4
    case 5: return t == 2 ? 6 : ((t == 1 || t == 3) ? 4 : 1);         // [1 4 6 4 1] / 16
    default: {                                                        // [2 7 14 18 14 7 2] / 64
      const int d = t < 3 ? 3 - t : t - 3;
      return d == 0 ? 18 : (d == 1 ? 14 : (d == 2 ? 7 : 2));
    }
  }
}

// log2 of the 2-D kernel's integer sum (4^2, 16^2, 64^2).
FERCUDA_HD int gaussian_shift(int ksize) { return ksize == 3 ? 4 : (ksize == 5 ? 8 : 12); }

// From the 2-D integer sum sum_ij tap_i * tap_j * src to the blurred pixel, rounded half up.
FERCUDA_HD uint8_t gaussian_round(int acc, int ksize) {
  const int shift = gaussian_shift(ksize);
  return static_cast<uint8_t>((acc + (1 << (shift - 1))) >> shift);
}

// ---- Gradients -------------------------------------------------------------

// Sobel aperture 3, separably: the horizontal difference and the vertical smoothing for dx.
// dx = (r0[c+1] - r0[c-1]) + 2 (r1[c+1] - r1[c-1]) + (r2[c+1] - r2[c-1]); dy is the transpose.
FERCUDA_HD int sobel_dx(int a00, int a02, int a10, int a12, int a20, int a22) {
  return (a02 - a00) + 2 * (a12 - a10) + (a22 - a20);
}
FERCUDA_HD int sobel_dy(int a00, int a01, int a02, int a20, int a21, int a22) {
  return (a20 - a00) + 2 * (a21 - a01) + (a22 - a02);
}

// The paper's eq. (2) on the 2x2 window whose top-left pixel is (r, c), times two so it
// stays an integer: 2P = d/dx (columns), 2Q = -d/dy (the paper's y axis points up).
FERCUDA_HD int paper_p2(int f00, int f01, int f10, int f11) { return (f01 - f00) + (f11 - f10); }
FERCUDA_HD int paper_q2(int f00, int f01, int f10, int f11) { return (f00 - f10) + (f01 - f11); }

// ---- Magnitude, thresholds, non-maximum suppression ----------------------

// Canny's magnitude of (dx, dy): |dx| + |dy|, or dx^2 + dy^2 for L2. cv2 computes the
// squares in 32-bit int, which wraps only for |dx|, |dy| near 32768; the unsigned sum
// reproduces that wrap without undefined behaviour.
FERCUDA_HD int magnitude(int dx, int dy, bool l2) {
  if (l2) {
    const uint32_t s = static_cast<uint32_t>(dx * dx) + static_cast<uint32_t>(dy * dy);
    return static_cast<int>(s);
  }
  return (dx < 0 ? -dx : dx) + (dy < 0 ? -dy : dy);
}

// cv2's L1 magnitude differs from |dx| + |dy| in one case. It treats a row 8 columns at a
// time (128-bit vectors of int16) and takes |v| in 16 bits there, which leaves -32768 as
// -32768; the columns past the last full group of 8 use a 32-bit |v| (32768). The result
// therefore depends on the column. Only hand-made gradients reach -32768: a Sobel of
// uint8 stays within +-1020.
constexpr int kCvMagnitudeLanes = 8;

FERCUDA_HD int abs_int16_wrapped(int v) { return v == -32768 ? -32768 : (v < 0 ? -v : v); }

// Canny's magnitude at column `col` of a row `width` wide, as cv2 computes it.
FERCUDA_HD int magnitude_at(int dx, int dy, bool l2, int col, int width) {
  if (!l2 && col < width / kCvMagnitudeLanes * kCvMagnitudeLanes) return abs_int16_wrapped(dx) + abs_int16_wrapped(dy);
  return magnitude(dx, dy, l2);
}

enum Sector : int { kHorizontal = 0, kVertical = 1, kDiagonal = 2 };

// The gradient's direction sector by cv2's fixed-point tangent test:
// with x = |dx|, y = |dy| << 15 and TG22 = round(tan(22.5 deg) * 2^15),
// y < x * TG22 is horizontal, y > x * (TG22 + 2^16) is vertical, the rest diagonal.
// The 32-bit sum wraps like cv2's int arithmetic for |dx| beyond ~28000.
constexpr int kCannyShift = 15;
constexpr int kTg22 = 13573;

FERCUDA_HD int gradient_sector(int dx, int dy) {
  const int x = dx < 0 ? -dx : dx;
  const int y = (dy < 0 ? -dy : dy) << kCannyShift;
  const int tg22x = x * kTg22;
  const int tg67x = static_cast<int>(static_cast<uint32_t>(tg22x) + (static_cast<uint32_t>(x) << (kCannyShift + 1)));
  // Both tests evaluated, no early return, so the function vectorizes inside a row loop.
  return y < tg22x ? kHorizontal : (y > tg67x ? kVertical : kDiagonal);
}

// For the diagonal sector: +1 when dx and dy share a sign (the maximum runs from the
// top-left to the bottom-right neighbour), -1 when their signs differ.
FERCUDA_HD int diagonal_step(int dx, int dy) { return (dx ^ dy) < 0 ? -1 : 1; }

// Labels of the nms() map.
enum Label : uint8_t { kNotEdge = 0, kWeak = 1, kStrong = 2 };

// Non-maximum suppression and double threshold for one pixel of magnitude m, given the two
// neighbours along its sector: `before` is left / up / the diagonal neighbour in the row
// above, `after` right / down / the one in the row below. Magnitudes outside the image are 0.
// A pixel survives if m > low and it is a maximum (ties go to the earlier pixel, except on
// diagonals where both comparisons are strict), then is strong if m > high.
FERCUDA_HD uint8_t nms_label(int m, int sector, int before, int after, int low, int high) {
  if (m <= low) return kNotEdge;
  const bool keep = sector == kDiagonal ? (m > before && m > after) : (m > before && m >= after);
  if (!keep) return kNotEdge;
  return m > high ? kStrong : kWeak;
}

// Offsets (row, column) of the `before` neighbour for a sector; `after` is the negation.
FERCUDA_HD void sector_offsets(int sector, int step, int* dr, int* dc) {
  if (sector == kHorizontal) { *dr = 0; *dc = -1; }
  else if (sector == kVertical) { *dr = -1; *dc = 0; }
  else { *dr = -1; *dc = -step; }
}

struct Thresholds {
  int low;
  int high;
};

// cv2 floors a threshold with cvFloor, which on x86 (SSE2 cvtsd2si) gives INT_MIN for any
// value >= 2^31, +inf included: such a `high` makes every candidate strong, such a `low`
// makes every local maximum a candidate. Only L1 thresholds can get there (L2 ones are
// clamped first); this reproduces cv2 on x86, where it was measured.
FERCUDA_HD int cv_floor_threshold(double v) {
  return v >= 2147483648.0 ? INT32_MIN : static_cast<int>(std::floor(v));
}

// cv2.Canny's threshold conventions: swap if low > high; for L2 clamp each to 32767 and
// square it as a double; then floor (cv_floor_threshold). Callers reject NaN and negative
// values first.
inline Thresholds canny_thresholds(double low, double high, bool l2) {
  if (low > high) {
    const double t = low;
    low = high;
    high = t;
  }
  if (l2) {
    low = low < 32767.0 ? low : 32767.0;
    high = high < 32767.0 ? high : 32767.0;
    low *= low;
    high *= high;
  }
  return {cv_floor_threshold(low), cv_floor_threshold(high)};
}

}  // namespace canny
}  // namespace fercuda

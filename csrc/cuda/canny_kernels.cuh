// Device code of the Canny CUDA kernels (canny_cuda.cu holds the host side). Kept apart so
// that tests/test_canny.py (its "emulated" cases) can compile it for the CPU with a small emulation
// of the CUDA built-ins (tests/cuda_emulation.h) and compare it with cv2 on a machine
// without a GPU.
#pragma once

#include <cstdint>

#include "fercuda/canny_math.h"

namespace fercuda {
namespace canny_kernels {

// Blocks of the fused kernel: small, so several images share an SM while one warp runs
// the (serial) hysteresis of each.
constexpr int kFusedThreads = 128;
// Images up to this size run the whole pipeline in one block (row masks are 64-bit).
constexpr int kWholeImageMax = 64;

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- Stages, one thread per output pixel ------------------------------------------

__global__ void gaussian_blur_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t total,
                                     int h, int w, int ksize) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  const int kh = ksize / 2;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    const int r = p / w, c = p - (p / w) * w;
    const uint8_t* im = src + n * hw;
    int acc = 0;
    for (int a = 0; a < ksize; ++a) {
      const uint8_t* row = im + static_cast<int64_t>(canny::reflect101(r + a - kh, h)) * w;
      int racc = 0;
      for (int b = 0; b < ksize; ++b) racc += canny::gaussian_tap(ksize, b) * row[canny::reflect101(c + b - kh, w)];
      acc += canny::gaussian_tap(ksize, a) * racc;
    }
    dst[i] = canny::gaussian_round(acc, ksize);
  }
}

__global__ void sobel_kernel(const uint8_t* __restrict__ src, int16_t* __restrict__ dx, int16_t* __restrict__ dy,
                             int64_t total, int h, int w) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    const int r = p / w, c = p - (p / w) * w;
    const uint8_t* im = src + n * hw;
    const uint8_t* rm = im + static_cast<int64_t>(canny::replicate(r - 1, h)) * w;
    const uint8_t* r0 = im + static_cast<int64_t>(r) * w;
    const uint8_t* rp = im + static_cast<int64_t>(canny::replicate(r + 1, h)) * w;
    const int cm = canny::replicate(c - 1, w), cp = canny::replicate(c + 1, w);
    dx[i] = static_cast<int16_t>(canny::sobel_dx(rm[cm], rm[cp], r0[cm], r0[cp], rp[cm], rp[cp]));
    dy[i] = static_cast<int16_t>(canny::sobel_dy(rm[cm], rm[c], rm[cp], rp[cm], rp[c], rp[cp]));
  }
}

__global__ void paper_gradient_kernel(const uint8_t* __restrict__ src, float* __restrict__ p_out,
                                      float* __restrict__ q_out, int64_t total, int h, int w) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    const int r = p / w, c = p - (p / w) * w;
    const uint8_t* im = src + n * hw;
    const uint8_t* r0 = im + static_cast<int64_t>(r) * w;
    const uint8_t* r1 = im + static_cast<int64_t>(canny::replicate(r + 1, h)) * w;
    const int c1 = canny::replicate(c + 1, w);
    p_out[i] = 0.5f * static_cast<float>(canny::paper_p2(r0[c], r0[c1], r1[c], r1[c1]));
    q_out[i] = 0.5f * static_cast<float>(canny::paper_q2(r0[c], r0[c1], r1[c], r1[c1]));
  }
}

// cv2's magnitude of a given gradient at (r, c), 0 outside the image. Given int16 gradients
// may hold -32768, whose |v| cv2 takes in 16 bits in some columns (canny::magnitude_at).
__device__ __forceinline__ int magnitude_at(const int16_t* dx, const int16_t* dy, int r, int c, int h, int w,
                                            bool l2) {
  if (r < 0 || r >= h || c < 0 || c >= w) return 0;
  const int64_t k = static_cast<int64_t>(r) * w + c;
  return canny::magnitude_at(dx[k], dy[k], l2, c, w);
}

__global__ void nms_kernel(const int16_t* __restrict__ dx, const int16_t* __restrict__ dy,
                           uint8_t* __restrict__ labels, int64_t total, int h, int w, int low, int high, bool l2) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    const int r = p / w, c = p - (p / w) * w;
    const int16_t* gx = dx + n * hw;
    const int16_t* gy = dy + n * hw;
    const int m = canny::magnitude_at(gx[p], gy[p], l2, c, w);
    uint8_t label = canny::kNotEdge;
    if (m > low) {
      const int sector = canny::gradient_sector(gx[p], gy[p]);
      int dr, dc;
      canny::sector_offsets(sector, canny::diagonal_step(gx[p], gy[p]), &dr, &dc);
      label = canny::nms_label(m, sector, magnitude_at(gx, gy, r + dr, c + dc, h, w, l2),
                               magnitude_at(gx, gy, r - dr, c - dc, h, w, l2), low, high);
    }
    labels[i] = label;
  }
}

// ---- Hysteresis by union-find over weak and strong pixels -------------------------
// Each image is its own forest: parent holds pixel indices local to the image, -1 for
// pixels that are no candidate. Parents only ever decrease (atomicMin), so the forest
// stays acyclic whatever the interleaving. Four launches, independent of the image.

// Labels other than weak (1) and strong (2) count as no edge, as in nms() maps.
__device__ __forceinline__ bool is_candidate(uint8_t label) {
  return label == canny::kWeak || label == canny::kStrong;
}

__device__ __forceinline__ int uf_find(const int* parent, int x) {
  // L2 loads: other threads relink roots during the merge kernel.
  for (int p = __ldcg(parent + x); p != x; p = __ldcg(parent + x)) x = p;
  return x;
}

__device__ void uf_unite(int* parent, int a, int b) {
  while (true) {
    a = uf_find(parent, a);
    b = uf_find(parent, b);
    if (a == b) return;
    if (a > b) {
      const int t = a;
      a = b;
      b = t;
    }
    const int old = atomicMin(parent + b, a);
    if (old == b) return;  // b was still a root and now hangs under a
    b = old;               // b was relinked meanwhile: join a with its new tree
  }
}

__global__ void uf_init_kernel(const uint8_t* __restrict__ labels, int* __restrict__ parent, int64_t total,
                               int64_t hw) {
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    parent[i] = is_candidate(labels[i]) ? static_cast<int>(i % hw) : -1;
  }
}

__global__ void uf_merge_kernel(int* parent, int64_t total, int h, int w) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    int* par = parent + n * hw;
    if (par[p] < 0) continue;
    const int r = p / w, c = p - (p / w) * w;
    // The four neighbours before this pixel in raster order; the others link to it.
    if (c > 0 && par[p - 1] >= 0) uf_unite(par, p, p - 1);
    if (r > 0) {
      const int up = p - w;
      if (c > 0 && par[up - 1] >= 0) uf_unite(par, p, up - 1);
      if (par[up] >= 0) uf_unite(par, p, up);
      if (c + 1 < w && par[up + 1] >= 0) uf_unite(par, p, up + 1);
    }
  }
}

__global__ void uf_flatten_kernel(const uint8_t* __restrict__ labels, int* parent, uint8_t* __restrict__ root_strong,
                                  int64_t total, int64_t hw) {
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    int* par = parent + n * hw;
    if (par[p] < 0) continue;
    const int root = uf_find(par, p);
    par[p] = root;
    if (labels[i] == canny::kStrong) root_strong[n * hw + root] = 1;
  }
}

__global__ void uf_output_kernel(const int* parent, const uint8_t* __restrict__ root_strong,
                                 uint8_t* __restrict__ out, int64_t total, int64_t hw) {
  for (int64_t i = global_thread(); i < total; i += global_stride()) {
    const int64_t n = i / hw;
    const int p = static_cast<int>(i - n * hw);
    const int* par = parent + n * hw;
    bool edge = false;
    if (par[p] >= 0) edge = root_strong[n * hw + uf_find(par, p)] != 0;
    out[i] = edge ? 255 : 0;
  }
}

// ---- Fused blur + gradient + NMS (+ hysteresis for whole images) -----------------

// Shared-memory layout of the fused kernel for tiles of th x tw pixels. The region of each
// stage is the tile grown by the halo the later stages read, clipped to the image:
// magnitudes +1 (NMS neighbours), blurred pixels +2 (Sobel of those), input +2+ksize/2.
// The blurred region overwrites the input once the horizontal pass has consumed it.
struct FusedLayout {
  int mag_offset;
  int tmp_offset;
  int in_offset;
  int bytes;
};

__host__ __device__ inline FusedLayout fused_layout(int th, int tw, int h, int w, int ksize) {
  const int kh = ksize / 2;
  const int mh = th + 2 < h ? th + 2 : h, mw = tw + 2 < w ? tw + 2 : w;
  const int bh = th + 4 < h ? th + 4 : h, bw = tw + 4 < w ? tw + 4 : w;
  const int ih = ksize ? (th + 4 + 2 * kh < h ? th + 4 + 2 * kh : h) : bh;
  const int iw = ksize ? (tw + 4 + 2 * kh < w ? tw + 4 + 2 * kh : w) : bw;
  FusedLayout l;
  l.mag_offset = 2 * kWholeImageMax * 8;  // the candidate and strong row masks come first
  l.tmp_offset = l.mag_offset + mh * mw * 4;
  l.in_offset = (l.tmp_offset + (ksize ? ih * bw * 2 : 0) + 15) & ~15;
  l.bytes = l.in_offset + ih * iw;
  return l;
}

using u64 = unsigned long long;

// Fills seeds along runs of candidate bits in both directions (Kogge-Stone occluded
// fill), so a strong pixel reaches its whole horizontal run of candidates at once.
__device__ __forceinline__ u64 row_fill(u64 seeds, u64 cand) {
  u64 up = seeds, up_p = cand, dn = seeds, dn_p = cand;
#pragma unroll
  for (int s = 1; s < 64; s *= 2) {
    up |= up_p & (up << s);
    up_p &= up_p << s;
    dn |= dn_p & (dn >> s);
    dn_p &= dn_p >> s;
  }
  return up | dn;
}

__device__ __forceinline__ u64 dilate(u64 x) { return x | (x << 1) | (x >> 1); }

// Hysteresis of a whole image of at most 64 x 64 pixels in one warp: lane l holds the masks
// of rows l and l + 32. Each round adds every candidate 8-connected to a strong pixel of an
// adjacent row, then fills along rows; it stops when no mask changes.
__device__ void warp_hysteresis(u64* cand_rows, u64* strong_rows) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x;
  const u64 c0 = cand_rows[lane], c1 = cand_rows[lane + 32];
  u64 s0 = row_fill(strong_rows[lane], c0), s1 = row_fill(strong_rows[lane + 32], c1);
  while (true) {
    u64 up0 = __shfl_up_sync(full, s0, 1);
    u64 dn0 = __shfl_down_sync(full, s0, 1);
    u64 up1 = __shfl_up_sync(full, s1, 1);
    u64 dn1 = __shfl_down_sync(full, s1, 1);
    const u64 row31 = __shfl_sync(full, s0, 31);
    const u64 row32 = __shfl_sync(full, s1, 0);
    if (lane == 0) {
      up0 = 0;
      up1 = row31;
    }
    if (lane == 31) {
      dn0 = row32;
      dn1 = 0;
    }
    const u64 n0 = row_fill(s0 | (dilate(up0 | dn0) & c0), c0);
    const u64 n1 = row_fill(s1 | (dilate(up1 | dn1) & c1), c1);
    const bool changed = n0 != s0 || n1 != s1;
    s0 = n0;
    s1 = n1;
    if (!__any_sync(full, changed)) break;
  }
  strong_rows[lane] = s0;
  strong_rows[lane + 32] = s1;
}

// One block per tile (kWhole: per image, the tile being the image). kWhole writes the edge
// map, otherwise the nms() labels of the tile. vec16: images hold a multiple of 16 pixels and
// both buffers are 16-byte aligned, so whole images move as uint4.
// Reflect-101 by one reflection, which covers every offset the kernels use unless the image
// is smaller than the kernel; then the general (modulo) form.
__device__ __forceinline__ int reflect101_near(int i, int n) {
  const int j = i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i);
  return static_cast<unsigned int>(j) < static_cast<unsigned int>(n) ? j : canny::reflect101(i, n);
}

// Calls f(i, row, col) for the elements tid, tid + kFusedThreads, ... of a rows x cols region
// in row-major order, tracking (row, col) by additions: a division per element would cost
// as much as the stencil it indexes.
template <class F>
__device__ __forceinline__ void for_each_in_region(int rows, int cols, F&& f) {
  const int count = rows * cols;
  if (count <= 0) return;
  const int step_r = kFusedThreads / cols, step_c = kFusedThreads - step_r * cols;
  int r = static_cast<int>(threadIdx.x) / cols, c = static_cast<int>(threadIdx.x) - r * cols;
  for (int i = threadIdx.x; i < count; i += kFusedThreads) {
    f(i, r, c);
    r += step_r;
    c += step_c;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
}

template <int kKsize, bool kPaper, bool kWhole>
__global__ void __launch_bounds__(kFusedThreads)
    canny_fused_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t n_img, int h, int w,
                       int th, int tw, int tiles_x, int64_t tiles_per_image, int low, int high, bool l2,
                       bool vec16) {
  extern __shared__ __align__(16) unsigned char smem[];
  const FusedLayout layout = fused_layout(th, tw, h, w, kKsize);
  u64* cand_rows = reinterpret_cast<u64*>(smem);
  u64* strong_rows = cand_rows + kWholeImageMax;
  int* mag = reinterpret_cast<int*>(smem + layout.mag_offset);
  uint16_t* tmp = reinterpret_cast<uint16_t*>(smem + layout.tmp_offset);
  uint8_t* in = smem + layout.in_offset;
  constexpr int kh = kKsize / 2;
  const int tid = threadIdx.x;
  const int64_t hw = static_cast<int64_t>(h) * w;
  const int64_t n_blocks = n_img * tiles_per_image;

  for (int64_t blk = blockIdx.x; blk < n_blocks; blk += gridDim.x) {
    const int64_t n = blk / tiles_per_image;
    const int t = static_cast<int>(blk - n * tiles_per_image);
    const int r0 = (t / tiles_x) * th, c0 = (t % tiles_x) * tw;
    const int r1 = min(h, r0 + th), c1 = min(w, c0 + tw);
    const int mr0 = max(0, r0 - 1), mr1 = min(h, r1 + 1), mc0 = max(0, c0 - 1), mc1 = min(w, c1 + 1);
    const int br0 = max(0, r0 - 2), br1 = min(h, r1 + 2), bc0 = max(0, c0 - 2), bc1 = min(w, c1 + 2);
    const int ir0 = max(0, br0 - kh), ir1 = min(h, br1 + kh), ic0 = max(0, bc0 - kh), ic1 = min(w, bc1 + kh);
    const int iw = ic1 - ic0, ih = ir1 - ir0;
    const uint8_t* im = src + n * hw;

    if (kWhole && vec16) {
      const uint4* s4 = reinterpret_cast<const uint4*>(im);
      uint4* d4 = reinterpret_cast<uint4*>(in);
      for (int i = tid; i < static_cast<int>(hw / 16); i += kFusedThreads) d4[i] = s4[i];
    } else {
      for_each_in_region(ih, iw, [&](int i, int rr, int cc) { in[i] = im[static_cast<int64_t>(ir0 + rr) * w + ic0 + cc]; });
    }
    if (kWhole) {
      for (int i = tid; i < 2 * kWholeImageMax; i += kFusedThreads) cand_rows[i] = 0;
    }
    __syncthreads();

    // Blur: horizontal pass over the input rows, then vertical, one rounding at the end.
    const uint8_t* blur = in;
    const int bw = bc1 - bc0;
    if constexpr (kKsize > 0) {
      for_each_in_region(ih, bw, [&](int i, int rr, int cc) {
        const int c = bc0 + cc;
        const uint8_t* row = in + rr * iw;
        int acc = 0;
        if (c >= kh && c + kh < w) {  // no border within reach: plain offsets
          const uint8_t* taps = row + (c - kh - ic0);
#pragma unroll
          for (int b = 0; b < kKsize; ++b) acc += canny::gaussian_tap(kKsize, b) * taps[b];
        } else {
#pragma unroll
          for (int b = 0; b < kKsize; ++b) acc += canny::gaussian_tap(kKsize, b) * row[reflect101_near(c + b - kh, w) - ic0];
        }
        tmp[i] = static_cast<uint16_t>(acc);
      });
      __syncthreads();
      uint8_t* blurred = in;
      for_each_in_region(br1 - br0, bw, [&](int i, int rr, int cc) {
        const int r = br0 + rr;
        int acc = 0;
        if (r >= kh && r + kh < h) {
          const uint16_t* taps = tmp + (r - kh - ir0) * bw + cc;
#pragma unroll
          for (int a = 0; a < kKsize; ++a) acc += canny::gaussian_tap(kKsize, a) * taps[a * bw];
        } else {
#pragma unroll
          for (int a = 0; a < kKsize; ++a) acc += canny::gaussian_tap(kKsize, a) * tmp[(reflect101_near(r + a - kh, h) - ir0) * bw + cc];
        }
        blurred[i] = canny::gaussian_round(acc, kKsize);
      });
      __syncthreads();
    }

    auto pixel = [&](int r, int c) -> int { return blur[(r - br0) * bw + (c - bc0)]; };
    auto gradient = [&](int r, int c, int* gx, int* gy) {
      if constexpr (kPaper) {
        const int rp = canny::replicate(r + 1, h), cp = canny::replicate(c + 1, w);
        const int f00 = pixel(r, c), f01 = pixel(r, cp), f10 = pixel(rp, c), f11 = pixel(rp, cp);
        *gx = canny::paper_p2(f00, f01, f10, f11);
        *gy = -canny::paper_q2(f00, f01, f10, f11);
      } else {
        const int rm = canny::replicate(r - 1, h), rp = canny::replicate(r + 1, h);
        const int cm = canny::replicate(c - 1, w), cp = canny::replicate(c + 1, w);
        const int a00 = pixel(rm, cm), a01 = pixel(rm, c), a02 = pixel(rm, cp);
        const int a10 = pixel(r, cm), a12 = pixel(r, cp);
        const int a20 = pixel(rp, cm), a21 = pixel(rp, c), a22 = pixel(rp, cp);
        *gx = canny::sobel_dx(a00, a02, a10, a12, a20, a22);
        *gy = canny::sobel_dy(a00, a01, a02, a20, a21, a22);
      }
    };

    const int mw = mc1 - mc0;
    for_each_in_region(mr1 - mr0, mw, [&](int i, int rr, int cc) {
      int gx, gy;
      gradient(mr0 + rr, mc0 + cc, &gx, &gy);
      mag[i] = canny::magnitude(gx, gy, l2);
    });
    __syncthreads();

    auto mag_at = [&](int r, int c) -> int {
      return (r < 0 || r >= h || c < 0 || c >= w) ? 0 : mag[(r - mr0) * mw + (c - mc0)];
    };
    const int tile_w = c1 - c0;
    for_each_in_region(r1 - r0, tile_w, [&](int, int rr, int cc) {
      const int r = r0 + rr, c = c0 + cc;
      const int m = mag_at(r, c);
      uint8_t label = canny::kNotEdge;
      if (m > low) {
        int gx, gy, dr, dc;
        gradient(r, c, &gx, &gy);
        const int sector = canny::gradient_sector(gx, gy);
        canny::sector_offsets(sector, canny::diagonal_step(gx, gy), &dr, &dc);
        label = canny::nms_label(m, sector, mag_at(r + dr, c + dc), mag_at(r - dr, c - dc), low, high);
      }
      if constexpr (kWhole) {
        if (label != canny::kNotEdge) {
          atomicOr(cand_rows + r, u64{1} << c);
          if (label == canny::kStrong) atomicOr(strong_rows + r, u64{1} << c);
        }
      } else {
        dst[n * hw + static_cast<int64_t>(r) * w + c] = label;
      }
    });

    if constexpr (kWhole) {
      __syncthreads();
      if (tid < 32) warp_hysteresis(cand_rows, strong_rows);
      __syncthreads();
      uint8_t* out = dst + n * hw;
      if (vec16) {
        for (int i = tid; i < static_cast<int>(hw / 16); i += kFusedThreads) {
          int r = (i * 16) / w, c = i * 16 - r * w;
          // Four words in named registers (an indexed local array would live on the stack).
          auto next_word = [&]() {
            unsigned int word = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if ((strong_rows[r] >> c) & 1) word |= 0xffu << (8 * k);
              if (++c == w) {
                c = 0;
                ++r;
              }
            }
            return word;
          };
          const unsigned int x = next_word();
          const unsigned int y = next_word();
          const unsigned int z = next_word();
          const unsigned int v = next_word();
          reinterpret_cast<uint4*>(out)[i] = make_uint4(x, y, z, v);
        }
      } else {
        for_each_in_region(h, w, [&](int i, int r, int c) { out[i] = ((strong_rows[r] >> c) & 1) ? 255 : 0; });
      }
    }
    __syncthreads();  // the next image reuses shared memory
  }
}

// ---- Launch plans (host) --------------------------------------------------------

// What canny_cuda.cu launches, computed from the sizes alone so that the emulated tests launch
// the same. The stage and union-find kernels loop over their pixels with a grid stride.
constexpr int kStageThreads = 256;
constexpr int kTile = 32;  // tiles of the fused kernel on images larger than kWholeImageMax

inline unsigned int stage_grid(int64_t total) {
  const int64_t blocks = (total + kStageThreads - 1) / kStageThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks < (int64_t{1} << 20) ? blocks : int64_t{1} << 20));
}

// The fused kernel: whole images (one block each, hysteresis included) up to kWholeImageMax a
// side, else kTile x kTile tiles whose label map the union-find kernels finish.
struct FusedPlan {
  bool whole;
  int th, tw;  // tile size: the image itself on the whole-image path
  int tiles_x;
  int64_t tiles_per_image;
  unsigned int grid;  // a block per tile; the kernel loops over the rest where the grid is capped
  int shared_bytes;
};

// tile > 0 forces the tiled path with tile x tile tiles (the tests' switch).
inline FusedPlan plan_fused(int64_t n, int h, int w, int ksize, int tile = 0) {
  FusedPlan p;
  p.whole = tile == 0 && h <= kWholeImageMax && w <= kWholeImageMax;
  p.th = p.whole ? h : (tile > 0 ? tile : kTile);
  p.tw = p.whole ? w : (tile > 0 ? tile : kTile);
  p.tiles_x = (w + p.tw - 1) / p.tw;
  p.tiles_per_image = static_cast<int64_t>(p.tiles_x) * ((h + p.th - 1) / p.th);
  const int64_t blocks = n * p.tiles_per_image;
  p.grid = static_cast<unsigned int>(blocks < 0x7fffffff ? blocks : 0x7fffffff);
  p.shared_bytes = fused_layout(p.th, p.tw, h, w, ksize).bytes;
  return p;
}

// The whole-image path copies images in and out 16 bytes at a time where it can.
inline bool whole_image_vec16(int h, int w, const void* src, const void* dst) {
  return (static_cast<int64_t>(h) * w) % 16 == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(dst) & 15) == 0;
}

}  // namespace canny_kernels
}  // namespace fercuda

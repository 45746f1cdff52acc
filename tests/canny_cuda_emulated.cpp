// The device code of csrc/cuda/canny_kernels.cuh compiled for the CPU (tests/cuda_emulation.h),
// with C entry points that launch it as canny_cuda.cu does. Loaded by
// tests/test_canny.py (the "emulated" backend) through ctypes.
#include <cstdio>

#include "cuda_emulation.h"

namespace fercuda {
namespace canny_kernels {
// The fused kernel's dynamic shared memory (blocks run one at a time): the GPU's default limit.
__attribute__((aligned(16))) unsigned char smem[emu::kDefaultSharedLimit];
}  // namespace canny_kernels
}  // namespace fercuda

#include "canny_kernels.cuh"

using namespace fercuda;
using namespace fercuda::canny_kernels;

namespace {

// The stage kernels loop with a grid stride: a few small blocks (not stage_grid's) exercise the
// loop and interleave the union-find threads.
constexpr unsigned int kEmuStageThreads = 64;

void hysteresis(const uint8_t* labels, uint8_t* out, int64_t n, int h, int w) {
  const int64_t total = n * h * w, hw = static_cast<int64_t>(h) * w;
  std::vector<int> parent(total);
  std::vector<uint8_t> root_strong(total, 0);
  int* par = parent.data();
  emu::launch(3, kEmuStageThreads, [&] { uf_init_kernel(labels, par, total, hw); });
  emu::launch(3, kEmuStageThreads, [&] { uf_merge_kernel(par, total, h, w); });
  emu::launch(3, kEmuStageThreads, [&] { uf_flatten_kernel(labels, par, root_strong.data(), total, hw); });
  emu::launch(3, kEmuStageThreads, [&] { uf_output_kernel(par, root_strong.data(), out, total, hw); });
}

template <int K, bool P, bool W>
void fused(const uint8_t* src, uint8_t* dst, int64_t n, int h, int w, const FusedPlan& plan, canny::Thresholds t,
           bool l2, bool vec16, unsigned int grid) {
  emu::launch(
      dim3{grid, 1, 1}, kFusedThreads,
      [&] {
        canny_fused_kernel<K, P, W>(src, dst, n, h, w, plan.th, plan.tw, plan.tiles_x, plan.tiles_per_image, t.low,
                                    t.high, l2, vec16);
      },
      smem, sizeof(smem), static_cast<std::size_t>(plan.shared_bytes));
}

template <bool W>
void fused_for(int ksize, bool paper, const uint8_t* src, uint8_t* dst, int64_t n, int h, int w,
               const FusedPlan& plan, canny::Thresholds t, bool l2, bool vec16, unsigned int grid) {
#define CASE(K)                                                                  \
  case K:                                                                        \
    if (paper)                                                                   \
      fused<K, true, W>(src, dst, n, h, w, plan, t, l2, vec16, grid);            \
    else                                                                         \
      fused<K, false, W>(src, dst, n, h, w, plan, t, l2, vec16, grid);           \
    break;
  switch (ksize) {
    CASE(0)
    CASE(3)
    CASE(5)
    CASE(7)
  }
#undef CASE
}

}  // namespace

extern "C" {

// canny_cuda's two paths, planned by plan_fused. tile > 0 forces the tiled path with tile x tile
// blocks; grid is the number of emulated blocks (fewer than the plan's exercises the kernel's
// block loop). A launch the GPU would refuse is reported on stderr and leaves out unwritten.
void emu_canny(const uint8_t* img, uint8_t* out, int64_t n, int h, int w, double low, double high, int ksize,
               int l2, int paper, int tile, unsigned int grid) {
  const canny::Thresholds t = canny::canny_thresholds(paper ? 2 * low : low, paper ? 2 * high : high, l2 != 0);
  const FusedPlan plan = plan_fused(n, h, w, ksize, tile);
  try {
    if (plan.whole) {
      fused_for<true>(ksize, paper != 0, img, out, n, h, w, plan, t, l2 != 0, whole_image_vec16(h, w, img, out),
                      grid);
    } else {
      std::vector<uint8_t> labels(n * h * w, 77);
      fused_for<false>(ksize, paper != 0, img, labels.data(), n, h, w, plan, t, l2 != 0, false, grid);
      hysteresis(labels.data(), out, n, h, w);
    }
  } catch (const emu::launch_error& e) {
    std::fprintf(stderr, "emu_canny: launch refused: %s\n", e.what());
  }
}

void emu_gaussian_blur(const uint8_t* img, uint8_t* out, int64_t n, int h, int w, int ksize) {
  emu::launch(2, kEmuStageThreads, [&] { gaussian_blur_kernel(img, out, n * h * w, h, w, ksize); });
}

void emu_sobel(const uint8_t* img, int16_t* dx, int16_t* dy, int64_t n, int h, int w) {
  emu::launch(2, kEmuStageThreads, [&] { sobel_kernel(img, dx, dy, n * h * w, h, w); });
}

void emu_paper_gradient(const uint8_t* img, float* p, float* q, int64_t n, int h, int w) {
  emu::launch(2, kEmuStageThreads, [&] { paper_gradient_kernel(img, p, q, n * h * w, h, w); });
}

void emu_nms(const int16_t* dx, const int16_t* dy, uint8_t* labels, int64_t n, int h, int w, double low,
             double high, int l2) {
  const canny::Thresholds t = canny::canny_thresholds(low, high, l2 != 0);
  emu::launch(2, kEmuStageThreads, [&] { nms_kernel(dx, dy, labels, n * h * w, h, w, t.low, t.high, l2 != 0); });
}

void emu_hysteresis(const uint8_t* labels, uint8_t* out, int64_t n, int h, int w) { hysteresis(labels, out, n, h, w); }

}  // extern "C"

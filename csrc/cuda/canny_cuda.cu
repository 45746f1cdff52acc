// CUDA kernels of the Canny family. Per-pixel arithmetic comes from canny_math.h, the
// same functions the CPU kernels use, so results match cv2 bit for bit on both devices.
//
// canny() has two paths:
//  - images up to 64x64 (FER2013 is 48x48): one thread block per image runs the whole
//    pipeline in shared memory; hysteresis works on one 64-bit mask per row inside a single
//    warp, so a whole batch is one launch;
//  - larger images: a fused blur + gradient + NMS kernel per 32x32 tile (with halos) writes
//    the label map, then union-find hysteresis in a fixed number of launches.
// Nothing synchronizes with the host, so every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string>

#include "canny_kernels.cuh"
#include "fercuda/canny_math.h"
#include "fercuda/checks.h"

namespace fercuda {
namespace {

using canny::Thresholds;
using namespace canny_kernels;

// labels, out: contiguous (n, h, w) uint8 on the current device.
void launch_hysteresis(const at::Tensor& labels, at::Tensor& out, int64_t n, int h, int w, cudaStream_t stream) {
  const int64_t total = n * h * w;
  const int64_t hw = static_cast<int64_t>(h) * w;
  at::Tensor parent = at::empty({total}, labels.options().dtype(at::kInt));
  at::Tensor root_strong = at::zeros({total}, labels.options());
  const unsigned int grid = stage_grid(total);
  const uint8_t* lab = labels.data_ptr<uint8_t>();
  int* par = parent.data_ptr<int>();
  uf_init_kernel<<<grid, kStageThreads, 0, stream>>>(lab, par, total, hw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  uf_merge_kernel<<<grid, kStageThreads, 0, stream>>>(par, total, h, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  uf_flatten_kernel<<<grid, kStageThreads, 0, stream>>>(lab, par, root_strong.data_ptr<uint8_t>(), total, hw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  uf_output_kernel<<<grid, kStageThreads, 0, stream>>>(par, root_strong.data_ptr<uint8_t>(),
                                                       out.data_ptr<uint8_t>(), total, hw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kKsize, bool kPaper, bool kWhole>
void launch_fused(const uint8_t* src, uint8_t* dst, int64_t n, int h, int w, const FusedPlan& plan, Thresholds t,
                  bool l2, bool vec16, cudaStream_t stream) {
  canny_fused_kernel<kKsize, kPaper, kWhole><<<plan.grid, kFusedThreads, plan.shared_bytes, stream>>>(
      src, dst, n, h, w, plan.th, plan.tw, plan.tiles_x, plan.tiles_per_image, t.low, t.high, l2, vec16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kWhole>
void launch_fused_for(int ksize, bool paper, const uint8_t* src, uint8_t* dst, int64_t n, int h, int w,
                      const FusedPlan& plan, Thresholds t, bool l2, bool vec16, cudaStream_t stream) {
#define FERCUDA_FUSED_CASE(K)                                                                         \
  case K:                                                                                             \
    if (paper)                                                                                        \
      launch_fused<K, true, kWhole>(src, dst, n, h, w, plan, t, l2, vec16, stream);                   \
    else                                                                                              \
      launch_fused<K, false, kWhole>(src, dst, n, h, w, plan, t, l2, vec16, stream);                  \
    break;
  switch (ksize) {
    FERCUDA_FUSED_CASE(0)
    FERCUDA_FUSED_CASE(3)
    FERCUDA_FUSED_CASE(5)
    FERCUDA_FUSED_CASE(7)
    default: TORCH_CHECK(false, "fercuda.canny: unsupported ksize ", ksize);
  }
#undef FERCUDA_FUSED_CASE
}

// ---- Host entry points --------------------------------------------------------------

// Per-image pixel indices are int (the union-find forest); the batch index is int64.
void check_image_size(const at::Tensor& batch, const char* op, const char* arg) {
  TORCH_CHECK(batch.size(1) * batch.size(2) <= INT_MAX, "fercuda.", op, ": argument '", arg,
              "' must have at most ", INT_MAX, " pixels per image, got ", batch.size(1), " x ", batch.size(2));
}

at::Tensor gaussian_blur_cuda(const at::Tensor& img, int64_t ksize) {
  check_gaussian_ksize(ksize, "gaussian_blur", /*allow_zero=*/false);
  c10::cuda::CUDAGuard guard(img.device());
  const at::Tensor src = as_image_batch(img, at::kByte, "gaussian_blur", "img");
  check_image_size(src, "gaussian_blur", "img");
  at::Tensor out = at::empty(img.sizes(), img.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = src.numel();
  if (total == 0) return out;
  gaussian_blur_kernel<<<stage_grid(total), kStageThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), total, static_cast<int>(src.size(1)),
      static_cast<int>(src.size(2)), static_cast<int>(ksize));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> sobel_cuda(const at::Tensor& img) {
  c10::cuda::CUDAGuard guard(img.device());
  const at::Tensor src = as_image_batch(img, at::kByte, "sobel", "img");
  check_image_size(src, "sobel", "img");
  const auto opts = img.options().dtype(at::kShort).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty(img.sizes(), opts), dy = at::empty(img.sizes(), opts);
  const int64_t total = src.numel();
  if (total == 0) return {dx, dy};
  sobel_kernel<<<stage_grid(total), kStageThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<uint8_t>(), dx.data_ptr<int16_t>(), dy.data_ptr<int16_t>(), total,
      static_cast<int>(src.size(1)), static_cast<int>(src.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dy};
}

std::tuple<at::Tensor, at::Tensor> paper_gradient_cuda(const at::Tensor& img) {
  c10::cuda::CUDAGuard guard(img.device());
  const at::Tensor src = as_image_batch(img, at::kByte, "paper_gradient", "img");
  check_image_size(src, "paper_gradient", "img");
  const auto opts = img.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor p = at::empty(img.sizes(), opts), q = at::empty(img.sizes(), opts);
  const int64_t total = src.numel();
  if (total == 0) return {p, q};
  paper_gradient_kernel<<<stage_grid(total), kStageThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<uint8_t>(), p.data_ptr<float>(), q.data_ptr<float>(), total, static_cast<int>(src.size(1)),
      static_cast<int>(src.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {p, q};
}

at::Tensor nms_cuda(const at::Tensor& dx, const at::Tensor& dy, double low, double high, bool l2_gradient) {
  check_same_device(dx, "dx", dy, "dy", "nms");
  check_same_shape(dx, "dx", dy, "dy", "nms");
  check_threshold(low, "nms", "low");
  check_threshold(high, "nms", "high");
  c10::cuda::CUDAGuard guard(dx.device());
  const at::Tensor gx = as_image_batch(dx, at::kShort, "nms", "dx");
  const at::Tensor gy = as_image_batch(dy, at::kShort, "nms", "dy");
  check_image_size(gx, "nms", "dx");
  at::Tensor out = at::empty(dx.sizes(), dx.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = gx.numel();
  if (total == 0) return out;
  const Thresholds t = canny::canny_thresholds(low, high, l2_gradient);
  nms_kernel<<<stage_grid(total), kStageThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      gx.data_ptr<int16_t>(), gy.data_ptr<int16_t>(), out.data_ptr<uint8_t>(), total, static_cast<int>(gx.size(1)),
      static_cast<int>(gx.size(2)), t.low, t.high, l2_gradient);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor hysteresis_cuda(const at::Tensor& edge_map) {
  c10::cuda::CUDAGuard guard(edge_map.device());
  const at::Tensor labels = as_image_batch(edge_map, at::kByte, "hysteresis", "edge_map");
  check_image_size(labels, "hysteresis", "edge_map");
  at::Tensor out =
      at::empty(edge_map.sizes(), edge_map.options().memory_format(at::MemoryFormat::Contiguous));
  if (labels.numel() == 0) return out;
  launch_hysteresis(labels, out, labels.size(0), static_cast<int>(labels.size(1)), static_cast<int>(labels.size(2)),
                    c10::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor canny_cuda(const at::Tensor& img, double low, double high, int64_t ksize, bool l2_gradient,
                      c10::string_view gradient) {
  const std::string gradient_kind(gradient.data(), gradient.size());
  check_gradient_kind(gradient_kind, "canny");
  check_gaussian_ksize(ksize, "canny", /*allow_zero=*/true);
  check_threshold(low, "canny", "low");
  check_threshold(high, "canny", "high");
  c10::cuda::CUDAGuard guard(img.device());
  const at::Tensor src = as_image_batch(img, at::kByte, "canny", "img");
  check_image_size(src, "canny", "img");
  at::Tensor out = at::empty(img.sizes(), img.options().memory_format(at::MemoryFormat::Contiguous));
  if (src.numel() == 0) return out;

  // The paper's gradient is computed times two (2P, -2Q), so the thresholds double too.
  const bool paper = gradient_kind == "paper";
  const Thresholds t = canny::canny_thresholds(paper ? 2.0 * low : low, paper ? 2.0 * high : high, l2_gradient);
  const int64_t n = src.size(0);
  const int h = static_cast<int>(src.size(1)), w = static_cast<int>(src.size(2));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int k = static_cast<int>(ksize);
  const FusedPlan plan = plan_fused(n, h, w, k);
  if (plan.whole) {
    const bool vec16 = whole_image_vec16(h, w, src.data_ptr(), out.data_ptr());
    launch_fused_for<true>(k, paper, src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, h, w, plan, t,
                           l2_gradient, vec16, stream);
  } else {
    at::Tensor labels = at::empty({n, h, w}, src.options());
    launch_fused_for<false>(k, paper, src.data_ptr<uint8_t>(), labels.data_ptr<uint8_t>(), n, h, w, plan, t,
                            l2_gradient, false, stream);
    launch_hysteresis(labels, out, n, h, w, stream);
  }
  return out;
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CUDA, m) {
  m.impl("gaussian_blur", &fercuda::gaussian_blur_cuda);
  m.impl("sobel", &fercuda::sobel_cuda);
  m.impl("paper_gradient", &fercuda::paper_gradient_cuda);
  m.impl("nms", &fercuda::nms_cuda);
  m.impl("hysteresis", &fercuda::hysteresis_cuda);
  m.impl("canny", &fercuda::canny_cuda);
}

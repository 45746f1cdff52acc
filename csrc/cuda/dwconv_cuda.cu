// Fused depthwise 3x3 convolution + BatchNorm + ReLU6: the CUDA ops. The kernels, and the plan of
// each launch (grid, block, shared memory, scratch, index width), are in dwconv_kernels.cuh; this
// file checks the arguments, allocates, dispatches on dtype and launches.
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

#include "dwconv_kernels.cuh"
#include "fercuda/checks.h"

namespace fercuda {
namespace {

using namespace dwconv_kernels;

// The dtypes the validation admits, and no others (double would only cost compile time).
#define FERCUDA_DISPATCH_DWCONV_TYPES(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The Problem of dwconv_kernels.cuh, with x in the layout it describes.
struct Prepared : Problem {
  at::Tensor x;  // NCHW- or channels_last-contiguous
  at::MemoryFormat format;
};

// The kernels index channels, rows and columns with int.
Prepared prepare(const char* op, const at::Tensor& x_in, int64_t stride, int64_t padding) {
  const int64_t c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  // The padded extents bound the output's too.
  const bool fits = c <= kIntMax && padding <= kIntMax / 4 && h + 2 * padding <= kIntMax && w + 2 * padding <= kIntMax;
  TORCH_CHECK(fits, "fercuda.", op, ": C and the padded H and W must each fit in int32, got shape ", shape_str(x_in),
              " and padding ", padding);
  const at::MemoryFormat format =
      dwconv_channels_last(x_in) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {make_problem(x_in.size(0), c, h, w, stride, padding, format == at::MemoryFormat::ChannelsLast),
          x_in.contiguous(format), format};
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// A 1-D grid of plan_*'s blocks, or the op's error naming what is too large.
unsigned int grid_1d(const Launch& l, const char* op, const char* what, int64_t elements) {
  TORCH_CHECK(l.grid_x <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": ", what, " too large, ",
              elements, " elements");
  return static_cast<unsigned int>(l.grid_x);
}

template <typename scalar_t, int kKind>
void launch_reduce(const Prepared& p, const ReducePlan& plan, const ReduceArgs<scalar_t>& args,
                   cudaStream_t stream) {
  // grid_x = ceil(C / 32) at most and grid_y <= 65535 (plan_reduce): both within the GPU's limits.
  const dim3 grid(static_cast<unsigned int>(plan.launch.grid_x), static_cast<unsigned int>(plan.launch.grid_y));
  dispatch_index_and_layout(plan.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kCL = decltype(cl_tag)::value;
    dwconv_reduce_kernel<scalar_t, index_t, kCL, kKind>
        <<<grid, plan.launch.threads, plan.launch.shared_bytes, stream>>>(args, p.g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_apply(const char* op, const Prepared& p, const at::Tensor& weight, const scalar_t* bias,
                  bool from_running, const float* p0, const float* p1, const float* p2, const float* p3, double eps,
                  at::Tensor& y, cudaStream_t stream) {
  const ApplyPlan plan = plan_apply(p);
  const unsigned int blocks = grid_1d(plan.launch, op, "output", y.numel());
  dispatch_stride(p.g.stride, [&](auto stride_tag) {
    constexpr int kStride = decltype(stride_tag)::value;
    dispatch_index_and_layout(plan.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kCL = decltype(cl_tag)::value;
      auto run = [&](auto kernel) {
        kernel<<<blocks, plan.launch.threads, plan.launch.shared_bytes, stream>>>(
            p.x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias, p0, p1, p2, p3,
            static_cast<float>(eps), y.mutable_data_ptr<scalar_t>(), p.g, static_cast<index_t>(plan.total_runs),
            static_cast<index_t>(plan.runs_per_row));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (from_running) run(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, true, kStride>);
      else run(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, false, kStride>);
    });
  });
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
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var, int64_t stride,
    int64_t padding, double eps, double momentum) {
  const char* op = "dwconv_bn_relu6_train";
  const auto out = check_dwconv_args(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding);
  check_dwconv_eps(op, eps);
  check_dwconv_momentum(op, momentum);
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(op, x, stride, padding);
  at::Tensor y = empty_output(p);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor save_mean = at::empty({p.g.channels}, f32);
  at::Tensor save_invstd = at::empty({p.g.channels}, f32);
  if (y.numel() == 0) {
    save_mean.zero_();
    save_invstd.zero_();
    return {y, save_mean, save_invstd, running_mean.clone(), running_var.clone(), at::empty({0}, save_mean.options())};
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

  const ReducePlan plan = plan_reduce(p, kForwardStats, sm_count());
  const Launch per_channel = plan_per_channel(p);
  at::Tensor slots = at::empty({plan.splits, p.g.channels, plan.slot_width}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_DWCONV_TYPES(x.scalar_type(), "fercuda.dwconv_bn_relu6_train", [&] {
    ReduceArgs<scalar_t> args{};
    args.x = p.x.const_data_ptr<scalar_t>();
    args.weight = w.const_data_ptr<scalar_t>();
    args.slots = slots.mutable_data_ptr<float>();
    args.positions = plan.positions;
    args.chunk = plan.chunk;
    launch_reduce<scalar_t, kForwardStats>(p, plan, args, stream);

    dwconv_finalize_stats_kernel<<<static_cast<unsigned int>(per_channel.grid_x), per_channel.threads,
                                   per_channel.shared_bytes, stream>>>(
        slots.const_data_ptr<float>(), plan.splits, p.g.channels, b_f.defined() ? b_f.const_data_ptr<float>() : nullptr,
        bn_w.const_data_ptr<float>(), bn_b.const_data_ptr<float>(), rm.mutable_data_ptr<float>(),
        rv.mutable_data_ptr<float>(), static_cast<float>(eps), static_cast<float>(momentum),
        save_mean.mutable_data_ptr<float>(), save_invstd.mutable_data_ptr<float>(),
        scale_shift.mutable_data_ptr<float>(), scale_shift.mutable_data_ptr<float>() + p.g.channels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_apply<scalar_t>(op, p, w, nullptr, /*from_running=*/false, scale_shift.const_data_ptr<float>(),
                           scale_shift.const_data_ptr<float>() + p.g.channels, nullptr, nullptr, eps, y, stream);
  });
  // save_z: none; the backward computes the conv again (in registers, cheaper than a read).
  return {y, save_mean, save_invstd, rm.to(running_mean.scalar_type()), rv.to(running_var.scalar_type()),
          at::empty({0}, save_mean.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_bn_relu6_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& invstd,
    int64_t stride, int64_t padding, bool training, const std::optional<at::Tensor>& z) {
  const char* op = "dwconv_bn_relu6_backward";
  const auto out = check_dwconv_args(op, x, weight, bias, bn_weight, bn_bias, mean, invstd, stride, padding, "mean",
                                     "invstd");
  check_dwconv_grad_out(op, grad_out, x, out);
  check_dwconv_saved_z(op, z, x, out);  // checked, not read: the kernels compute the conv again
  const int64_t ho = out[2], wo = out[3];
  const c10::cuda::CUDAGuard guard(x.device());
  Prepared p = prepare(op, x, stride, padding);
  const int64_t channels = p.g.channels;
  const int64_t positions = output_positions(p);

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

  const int sms = sm_count();
  const ReducePlan plan_sums = plan_reduce(p, kBackwardSums, sms);
  const ReducePlan plan_grads = plan_reduce(p, kBackwardGrads, sms);
  const Launch per_channel = plan_per_channel(p);
  const GradInputPlan plan_gx = plan_grad_input(p);
  at::Tensor slots_sums = at::empty({plan_sums.splits, channels, plan_sums.slot_width}, f32);
  at::Tensor slots_grads = at::empty({plan_grads.splits, channels, plan_grads.slot_width}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int channel_blocks = static_cast<unsigned int>(per_channel.grid_x);
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
    args.positions = plan_sums.positions;
    args.chunk = plan_sums.chunk;

    args.slots = slots_sums.mutable_data_ptr<float>();
    launch_reduce<scalar_t, kBackwardSums>(p, plan_sums, args, stream);
    dwconv_finalize_bn_grads_kernel<<<channel_blocks, per_channel.threads, per_channel.shared_bytes, stream>>>(
        slots_sums.const_data_ptr<float>(), plan_sums.splits, static_cast<int>(channels),
        static_cast<double>(positions), training, bn_w.const_data_ptr<float>(), invstd_f.const_data_ptr<float>(),
        grad_bn_weight_f.mutable_data_ptr<float>(), grad_bn_bias_f.mutable_data_ptr<float>(),
        coef.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    args.coef = coef.const_data_ptr<float>();
    args.gz = gz.mutable_data_ptr<float>();
    args.chunk = plan_grads.chunk;
    args.slots = slots_grads.mutable_data_ptr<float>();
    launch_reduce<scalar_t, kBackwardGrads>(p, plan_grads, args, stream);
    dwconv_finalize_conv_grads_kernel<scalar_t>
        <<<channel_blocks, per_channel.threads, per_channel.shared_bytes, stream>>>(
            slots_grads.const_data_ptr<float>(), plan_grads.splits, static_cast<int>(channels),
            grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const unsigned int blocks = grid_1d(plan_gx.launch, op, "input", plan_gx.total);
    dispatch_index_and_layout(plan_gx.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kCL = decltype(cl_tag)::value;
      dwconv_grad_input_kernel<scalar_t, index_t, kCL>
          <<<blocks, plan_gx.launch.threads, plan_gx.launch.shared_bytes, stream>>>(
              gz.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), p.g,
              static_cast<index_t>(plan_gx.total));
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

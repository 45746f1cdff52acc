// BatchNorm + ReLU6 (or identity) + residual add: the CUDA ops. The kernels and their launch plans
// are in bn_act_kernels.cuh; this file checks the arguments, allocates, dispatches on dtype and
// launches.
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

#include "bn_act_kernels.cuh"
#include "fercuda/checks.h"

namespace fercuda {
namespace {

using namespace bn_act_kernels;

#define FERCUDA_DISPATCH_BN_ACT_TYPES(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

struct Prepared {
  Problem pr;
  at::Tensor x;  // NCHW- or channels_last-contiguous
  at::MemoryFormat format;
};

Prepared prepare(const at::Tensor& x_in) {
  const bool cl = dwconv_channels_last(x_in);
  const at::MemoryFormat format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {{x_in.size(0), x_in.size(1), x_in.size(2) * x_in.size(3), cl}, x_in.contiguous(format), format};
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

unsigned int grid_of(int64_t blocks, const char* op, int64_t elements) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": x too large, ", elements,
              " elements");
  return static_cast<unsigned int>(blocks);
}

template <typename F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename scalar_t>
void launch_apply(const char* op, const Prepared& p, const scalar_t* residual, bool relu6, bool from_running,
                  const float* weight, const float* bias, const float* mean, const float* var_or_invstd, double eps,
                  at::Tensor& y, cudaStream_t stream) {
  const unsigned int blocks = grid_of(elementwise_blocks(p.pr.total()), op, p.pr.total());
  with_bool(relu6, [&](auto relu6_tag) {
    with_bool(residual != nullptr, [&](auto residual_tag) {
      with_bool(from_running, [&](auto running_tag) {
        bn_act_apply_kernel<scalar_t, decltype(relu6_tag)::value, decltype(residual_tag)::value,
                            decltype(running_tag)::value><<<blocks, kThreads, 0, stream>>>(
            y.mutable_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), residual, weight, bias, mean,
            var_or_invstd, static_cast<float>(eps), p.pr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

template <typename scalar_t, int kKind>
void launch_reduce(const Prepared& p, const ReducePlan& plan, bool relu6, float* part, const scalar_t* g,
                   const float* mean, const float* invstd, const float* weight, const float* bias,
                   cudaStream_t stream) {
  // grid x = ceil(C / 32) or C (checked by the caller), grid y <= 65535 (plan_reduce).
  const dim3 grid(static_cast<unsigned int>(plan.groups), static_cast<unsigned int>(plan.splits));
  with_bool(p.pr.channels_last, [&](auto cl_tag) {
    with_bool(relu6, [&](auto relu6_tag) {
      bn_act_reduce_kernel<scalar_t, decltype(cl_tag)::value, kKind, decltype(relu6_tag)::value>
          <<<grid, plan.threads, plan.shared_bytes, stream>>>(part, p.x.const_data_ptr<scalar_t>(), g, mean, invstd,
                                                              weight, bias, p.pr, plan.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor empty_output(const Prepared& p) { return at::empty(p.x.sizes(), p.x.options().memory_format(p.format)); }

at::Tensor batch_norm_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& residual, bool relu6, double eps) {
  const char* op = "batch_norm_act";
  check_bn_act_args(op, x, weight, bias, running_mean, running_var, residual, /*allow_double=*/false);
  check_dwconv_eps(op, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const Prepared p = prepare(x);
  at::Tensor y = empty_output(p);
  if (y.numel() == 0) return y;
  const at::Tensor w = as_float(weight), b = as_float(bias), mean = as_float(running_mean), var = as_float(running_var);
  const at::Tensor r = residual.has_value() ? residual->contiguous(p.format) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "fercuda.batch_norm_act", [&] {
    launch_apply<scalar_t>(op, p, r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, relu6, /*from_running=*/true,
                           w.const_data_ptr<float>(), b.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                           var.const_data_ptr<float>(), eps, y, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_train_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, const std::optional<at::Tensor>& residual, bool relu6, double eps,
    double momentum) {
  const char* op = "batch_norm_act_train";
  check_bn_act_args(op, x, weight, bias, running_mean, running_var, residual, /*allow_double=*/false);
  check_dwconv_eps(op, eps);
  check_dwconv_momentum(op, momentum);
  const c10::cuda::CUDAGuard guard(x.device());
  const Prepared p = prepare(x);
  at::Tensor y = empty_output(p);
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t channels = p.pr.c;
  if (y.numel() == 0) {
    // nn.BatchNorm2d leaves the running statistics alone on an empty batch.
    return {y, at::zeros({channels}, f32), at::ones({channels}, f32), running_mean.clone(), running_var.clone()};
  }
  check_bn_act_batch_stats(op, x.size(0), channels, x.size(2), x.size(3));
  TORCH_CHECK(channels <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": too many channels, ", channels);
  const at::Tensor w = as_float(weight), b = as_float(bias);
  at::Tensor rm = running_mean.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor rv = running_var.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor save_mean = at::empty({channels}, f32), save_invstd = at::empty({channels}, f32);
  const at::Tensor r = residual.has_value() ? residual->contiguous(p.format) : at::Tensor();
  const ReducePlan plan = plan_reduce(p.pr, sm_count());
  at::Tensor part = at::empty({plan.splits, channels, kSlot}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "fercuda.batch_norm_act_train", [&] {
    launch_reduce<scalar_t, kKindStats>(p, plan, false, part.mutable_data_ptr<float>(), nullptr, nullptr, nullptr,
                                        nullptr, nullptr, stream);
    bn_act_merge_stats_kernel<<<static_cast<unsigned int>(per_channel_blocks(channels)), kThreads, 0, stream>>>(
        part.const_data_ptr<float>(), plan.splits, channels, static_cast<float>(eps), static_cast<float>(momentum),
        save_mean.mutable_data_ptr<float>(), save_invstd.mutable_data_ptr<float>(), rm.mutable_data_ptr<float>(),
        rv.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<scalar_t>(op, p, r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, relu6, /*from_running=*/false,
                           w.const_data_ptr<float>(), b.const_data_ptr<float>(), save_mean.const_data_ptr<float>(),
                           save_invstd.const_data_ptr<float>(), eps, y, stream);
  });
  return {y, save_mean, save_invstd, rm.to(running_mean.scalar_type()), rv.to(running_var.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu6, bool training) {
  const char* op = "batch_norm_act_backward";
  check_bn_act_args(op, x, weight, bias, mean, invstd, std::nullopt, /*allow_double=*/false, "mean", "invstd");
  check_bn_act_grad_out(op, grad_out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Prepared p = prepare(x);
  const int64_t channels = p.pr.c;
  at::Tensor grad_x = empty_output(p);
  if (x.numel() == 0) {
    return {grad_x, at::zeros({channels}, weight.options()), at::zeros({channels}, bias.options())};
  }
  TORCH_CHECK(channels <= std::numeric_limits<int32_t>::max(), "fercuda.", op, ": too many channels, ", channels);
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor g = grad_out.contiguous(p.format);
  const at::Tensor w = as_float(weight), b = as_float(bias), mu = as_float(mean), is = as_float(invstd);
  at::Tensor sum_ga = at::empty({channels}, f32), sum_ga_xhat = at::empty({channels}, f32);
  at::Tensor k = at::empty({channels, 3}, f32);
  const ReducePlan plan = plan_reduce(p.pr, sm_count());
  at::Tensor part = at::empty({plan.splits, channels, kSlot}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FERCUDA_DISPATCH_BN_ACT_TYPES(x.scalar_type(), "fercuda.batch_norm_act_backward", [&] {
    launch_reduce<scalar_t, kKindGrad>(p, plan, relu6, part.mutable_data_ptr<float>(), g.const_data_ptr<scalar_t>(),
                                       mu.const_data_ptr<float>(), is.const_data_ptr<float>(),
                                       w.const_data_ptr<float>(), b.const_data_ptr<float>(), stream);
    bn_act_merge_grad_kernel<<<static_cast<unsigned int>(per_channel_blocks(channels)), kThreads, 0, stream>>>(
        part.const_data_ptr<float>(), plan.splits, channels, p.pr.positions(), w.const_data_ptr<float>(),
        is.const_data_ptr<float>(), training, sum_ga.mutable_data_ptr<float>(), sum_ga_xhat.mutable_data_ptr<float>(),
        k.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned int blocks = grid_of(elementwise_blocks(p.pr.total()), op, p.pr.total());
    with_bool(relu6, [&](auto relu6_tag) {
      bn_act_grad_x_kernel<scalar_t, decltype(relu6_tag)::value><<<blocks, kThreads, 0, stream>>>(
          grad_x.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
          w.const_data_ptr<float>(), b.const_data_ptr<float>(), mu.const_data_ptr<float>(), is.const_data_ptr<float>(),
          k.const_data_ptr<float>(), p.pr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, sum_ga_xhat.to(weight.scalar_type()), sum_ga.to(bias.scalar_type())};
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, CUDA, m) {
  m.impl("batch_norm_act", &fercuda::batch_norm_act_cuda);
  m.impl("batch_norm_act_train", &fercuda::batch_norm_act_train_cuda);
  m.impl("batch_norm_act_backward", &fercuda::batch_norm_act_backward_cuda);
}

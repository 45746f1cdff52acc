// The device code of csrc/cuda/bn_act_kernels.cuh compiled for the CPU (tests/cuda_emulation.h),
// with C entry points that launch it as bn_act_cuda.cu does: the same plans and kernel
// instantiations, in the same order, on buffers in the op's layouts. The op's argument checks,
// dtype conversions and allocations stay with the caller. Loaded by tests/test_bn_act.py (its
// "emulated" cases) through ctypes.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace fercuda {
namespace bn_act_kernels {
// The reductions' dynamic shared memory (blocks run one at a time): the GPU's default limit.
__attribute__((aligned(16))) unsigned char bn_act_smem[emu::kDefaultSharedLimit];
}  // namespace bn_act_kernels
}  // namespace fercuda

#include "bn_act_kernels.cuh"

using namespace fercuda::bn_act_kernels;

namespace {

thread_local std::string last_error;

// The dtype codes of the Python side: 0 float32, 1 float16, 2 bfloat16.
template <class F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(c10::Half{}); break;
    case 2: f(c10::BFloat16{}); break;
    default: throw std::invalid_argument("dtype code " + std::to_string(dtype));
  }
}

template <class F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

void run_1d(int64_t blocks, const std::function<void()>& body) {
  if (blocks > std::numeric_limits<int32_t>::max()) throw emu::launch_error("grid too large");
  emu::launch(dim3{static_cast<unsigned int>(blocks), 1, 1}, kThreads, body);
}

// Scratch the op takes from at::empty: poisoned, so a value read before it is written shows.
std::vector<float> scratch(int64_t floats) {
  return std::vector<float>(static_cast<std::size_t>(floats), std::numeric_limits<float>::quiet_NaN());
}

template <typename scalar_t, int kKind>
void launch_reduce(const Problem& pr, const ReducePlan& plan, bool relu6, float* part, const scalar_t* x,
                   const scalar_t* g, const float* mean, const float* invstd, const float* weight, const float* bias) {
  const dim3 grid{static_cast<unsigned int>(plan.groups), static_cast<unsigned int>(plan.splits), 1};
  with_bool(pr.channels_last, [&](auto cl_tag) {
    with_bool(relu6, [&](auto relu6_tag) {
      emu::launch(
          grid, plan.threads,
          [&] {
            bn_act_reduce_kernel<scalar_t, decltype(cl_tag)::value, kKind, decltype(relu6_tag)::value>(
                part, x, g, mean, invstd, weight, bias, pr, plan.chunk);
          },
          bn_act_smem, sizeof(bn_act_smem), static_cast<std::size_t>(plan.shared_bytes));
    });
  });
}

template <typename scalar_t>
void launch_apply(const Problem& pr, const scalar_t* x, const scalar_t* r, bool relu6, bool from_running,
                  const float* weight, const float* bias, const float* mean, const float* var_or_invstd, double eps,
                  scalar_t* y) {
  with_bool(relu6, [&](auto relu6_tag) {
    with_bool(r != nullptr, [&](auto residual_tag) {
      with_bool(from_running, [&](auto running_tag) {
        run_1d(elementwise_blocks(pr.total()), [&] {
          bn_act_apply_kernel<scalar_t, decltype(relu6_tag)::value, decltype(residual_tag)::value,
                              decltype(running_tag)::value>(y, x, r, weight, bias, mean, var_or_invstd,
                                                            static_cast<float>(eps), pr);
        });
      });
    });
  });
}

Problem problem(int64_t n, int64_t c, int64_t p, int channels_last) { return {n, c, p, channels_last != 0}; }

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error.c_str(); }

// The reduction plan bn_act_cuda.cu would launch: out = {channel groups, splits, chunk}.
void emu_bn_act_plan(int64_t n, int64_t c, int64_t p, int channels_last, int sm_count, int64_t min_chunk,
                     int64_t* out) {
  const ReducePlan plan = plan_reduce(problem(n, c, p, channels_last), sm_count, min_chunk);
  out[0] = plan.groups;
  out[1] = plan.splits;
  out[2] = plan.chunk;
}

// batch_norm_act_cuda: x, residual (may be null) and y in the dtype; weight, bias, mean, var float32.
int emu_bn_act_inference(int dtype, const void* x, const void* residual, const float* weight, const float* bias,
                         const float* mean, const float* var, void* y, int64_t n, int64_t c, int64_t p,
                         int channels_last, int relu6, double eps) {
  return guarded([&] {
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_apply<scalar_t>(problem(n, c, p, channels_last), static_cast<const scalar_t*>(x),
                             static_cast<const scalar_t*>(residual), relu6 != 0, /*from_running=*/true, weight, bias,
                             mean, var, eps, static_cast<scalar_t*>(y));
    });
  });
}

// batch_norm_act_train_cuda: running_mean / running_var (float32) updated in place.
int emu_bn_act_train(int dtype, const void* x, const void* residual, const float* weight, const float* bias,
                     float* running_mean, float* running_var, void* y, float* save_mean, float* save_invstd,
                     int64_t n, int64_t c, int64_t p, int channels_last, int relu6, double eps, double momentum,
                     int sm_count, int64_t min_chunk) {
  return guarded([&] {
    const Problem pr = problem(n, c, p, channels_last);
    const ReducePlan plan = plan_reduce(pr, sm_count, min_chunk);
    std::vector<float> part = scratch(plan.splits * c * kSlot);
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* xs = static_cast<const scalar_t*>(x);
      launch_reduce<scalar_t, kKindStats>(pr, plan, false, part.data(), xs, nullptr, nullptr, nullptr, nullptr,
                                          nullptr);
      run_1d(per_channel_blocks(c), [&] {
        bn_act_merge_stats_kernel(part.data(), plan.splits, c, static_cast<float>(eps), static_cast<float>(momentum),
                                  save_mean, save_invstd, running_mean, running_var);
      });
      launch_apply<scalar_t>(pr, xs, static_cast<const scalar_t*>(residual), relu6 != 0, /*from_running=*/false,
                             weight, bias, save_mean, save_invstd, eps, static_cast<scalar_t*>(y));
    });
  });
}

// batch_norm_act_backward_cuda: grad_weight = sum(ga * xhat) and grad_bias = sum(ga), float32.
int emu_bn_act_backward(int dtype, const void* grad_out, const void* x, const float* weight, const float* bias,
                        const float* mean, const float* invstd, void* grad_x, float* grad_weight, float* grad_bias,
                        int64_t n, int64_t c, int64_t p, int channels_last, int relu6, int training, int sm_count,
                        int64_t min_chunk) {
  return guarded([&] {
    const Problem pr = problem(n, c, p, channels_last);
    const ReducePlan plan = plan_reduce(pr, sm_count, min_chunk);
    std::vector<float> part = scratch(plan.splits * c * kSlot), k = scratch(c * 3);
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* xs = static_cast<const scalar_t*>(x);
      const auto* gs = static_cast<const scalar_t*>(grad_out);
      launch_reduce<scalar_t, kKindGrad>(pr, plan, relu6 != 0, part.data(), xs, gs, mean, invstd, weight, bias);
      run_1d(per_channel_blocks(c), [&] {
        bn_act_merge_grad_kernel(part.data(), plan.splits, c, pr.positions(), weight, invstd, training != 0,
                                 grad_bias, grad_weight, k.data());
      });
      with_bool(relu6 != 0, [&](auto relu6_tag) {
        run_1d(elementwise_blocks(pr.total()), [&] {
          bn_act_grad_x_kernel<scalar_t, decltype(relu6_tag)::value>(static_cast<scalar_t*>(grad_x), gs, xs, weight,
                                                                     bias, mean, invstd, k.data(), pr);
        });
      });
    });
  });
}

}  // extern "C"

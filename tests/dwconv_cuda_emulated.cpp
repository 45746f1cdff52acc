// The device code of csrc/cuda/dwconv_kernels.cuh compiled for the CPU (tests/cuda_emulation.h),
// with C entry points that launch it as dwconv_cuda.cu does: the same plans (grid, block, shared
// memory, scratch sizes, index width) and the same kernel instantiations, in the same order, on
// buffers in the op's layouts. The op's argument checks, dtype conversions and allocations stay
// with the caller. Loaded by tests/test_dwconv.py (its "emulated" cases) through ctypes.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <vector>

#include "cuda_emulation.h"

namespace fercuda {
namespace dwconv_kernels {
// The reductions' dynamic shared memory (blocks run one at a time): the GPU's default limit.
__attribute__((aligned(16))) unsigned char reduce_smem[emu::kDefaultSharedLimit];
}  // namespace dwconv_kernels
}  // namespace fercuda

#include "dwconv_kernels.cuh"

using namespace fercuda::dwconv_kernels;

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

// Runs an entry point's body; a launch the GPU would refuse comes back as 1 and emu_last_error().
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

template <class F>
void run(const Launch& l, F&& body) {
  const dim3 grid{static_cast<unsigned int>(l.grid_x), static_cast<unsigned int>(l.grid_y), 1};
  if (l.grid_x > std::numeric_limits<int32_t>::max()) throw emu::launch_error("grid too large");
  emu::launch(grid, static_cast<unsigned int>(l.threads), body, reduce_smem, sizeof(reduce_smem),
              static_cast<std::size_t>(l.shared_bytes));
}

LaunchSwitches switches(int64_t reduce_min_chunk, int force_int64_index) {
  LaunchSwitches s;
  s.force_int64_index = force_int64_index != 0;
  s.reduce_min_chunk = reduce_min_chunk;
  return s;
}

// Scratch the op takes from at::empty: poisoned, so a value read before it is written shows.
std::vector<float> scratch(int64_t floats) {
  return std::vector<float>(static_cast<std::size_t>(floats), std::numeric_limits<float>::quiet_NaN());
}

template <typename scalar_t>
void launch_apply(const Problem& p, const LaunchSwitches& s, const scalar_t* x, const scalar_t* weight,
                  const scalar_t* bias, bool from_running, const float* p0, const float* p1, const float* p2,
                  const float* p3, double eps, scalar_t* y) {
  const ApplyPlan plan = plan_apply(p, s);
  dispatch_stride(p.g.stride, [&](auto stride_tag) {
    constexpr int kStride = decltype(stride_tag)::value;
    dispatch_index_and_layout(plan.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool kCL = decltype(cl_tag)::value;
      auto go = [&](auto kernel) {
        run(plan.launch, [&] {
          kernel(x, weight, bias, p0, p1, p2, p3, static_cast<float>(eps), y, p.g,
                 static_cast<index_t>(plan.total_runs), static_cast<index_t>(plan.runs_per_row));
        });
      };
      if (from_running) go(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, true, kStride>);
      else go(dwconv_bn_relu6_apply_kernel<scalar_t, index_t, kCL, false, kStride>);
    });
  });
}

template <typename scalar_t, int kKind>
void launch_reduce(const Problem& p, const ReducePlan& plan, const ReduceArgs<scalar_t>& args) {
  dispatch_index_and_layout(plan.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
    using index_t = decltype(index_tag);
    constexpr bool kCL = decltype(cl_tag)::value;
    run(plan.launch, [&] { dwconv_reduce_kernel<scalar_t, index_t, kCL, kKind>(args, p.g); });
  });
}

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error.c_str(); }

// The plans dwconv_cuda.cu would launch, for the tests to check what a case exercises:
// out = {apply blocks, apply int64, reduce channel groups, reduce splits, reduce chunk,
//        reduce int64, reduce shared bytes (forward stats), grad_x blocks, grad_x int64}.
void emu_dwconv_plans(int64_t n, int64_t c, int64_t h, int64_t w, int stride, int pad, int channels_last,
                      int sm_count, int64_t reduce_min_chunk, int force_int64_index, int64_t* out) {
  const Problem p = make_problem(n, c, h, w, stride, pad, channels_last != 0);
  const LaunchSwitches s = switches(reduce_min_chunk, force_int64_index);
  const ApplyPlan apply = plan_apply(p, s);
  const ReducePlan reduce = plan_reduce(p, kForwardStats, sm_count, s);
  const GradInputPlan gx = plan_grad_input(p, s);
  const int64_t values[] = {apply.launch.grid_x, apply.launch.int64_index, reduce.launch.grid_x,
                            reduce.splits,       reduce.chunk,             reduce.launch.int64_index,
                            reduce.launch.shared_bytes, gx.launch.grid_x,  gx.launch.int64_index};
  std::copy(std::begin(values), std::end(values), out);
}

// dwconv_bn_relu6_cuda: BatchNorm folded from the running statistics. x, weight, bias (may be
// null) and y in the dtype; bn_weight, bn_bias, mean, var float32.
int emu_dwconv_inference(int dtype, const void* x, const void* weight, const void* bias, const float* bn_weight,
                         const float* bn_bias, const float* mean, const float* var, void* y, int64_t n, int64_t c,
                         int64_t h, int64_t w, int stride, int pad, int channels_last, double eps,
                         int force_int64_index) {
  return guarded([&] {
    const Problem p = make_problem(n, c, h, w, stride, pad, channels_last != 0);
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_apply<scalar_t>(p, switches(0, force_int64_index), static_cast<const scalar_t*>(x),
                             static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(bias),
                             /*from_running=*/true, bn_weight, bn_bias, mean, var, eps, static_cast<scalar_t*>(y));
    });
  });
}

// dwconv_bn_relu6_train_cuda: y, save_mean and save_invstd; running_mean / running_var (float32,
// the op's fresh copies) updated in place. bias_f: the conv bias in float32, or null.
int emu_dwconv_train(int dtype, const void* x, const void* weight, const float* bias_f, const float* bn_weight,
                     const float* bn_bias, float* running_mean, float* running_var, void* y, float* save_mean,
                     float* save_invstd, int64_t n, int64_t c, int64_t h, int64_t w, int stride, int pad,
                     int channels_last, double eps, double momentum, int sm_count, int64_t reduce_min_chunk,
                     int force_int64_index) {
  return guarded([&] {
    const Problem p = make_problem(n, c, h, w, stride, pad, channels_last != 0);
    const LaunchSwitches s = switches(reduce_min_chunk, force_int64_index);
    const ReducePlan plan = plan_reduce(p, kForwardStats, sm_count, s);
    const Launch per_channel = plan_per_channel(p);
    std::vector<float> slots = scratch(plan.splits * c * plan.slot_width);
    std::vector<float> scale_shift = scratch(2 * c);
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      ReduceArgs<scalar_t> args{};
      args.x = static_cast<const scalar_t*>(x);
      args.weight = static_cast<const scalar_t*>(weight);
      args.slots = slots.data();
      args.positions = plan.positions;
      args.chunk = plan.chunk;
      launch_reduce<scalar_t, kForwardStats>(p, plan, args);

      run(per_channel, [&] {
        dwconv_finalize_stats_kernel(slots.data(), plan.splits, p.g.channels, bias_f, bn_weight, bn_bias, running_mean,
                                     running_var, static_cast<float>(eps), static_cast<float>(momentum), save_mean,
                                     save_invstd, scale_shift.data(), scale_shift.data() + c);
      });

      launch_apply<scalar_t>(p, s, args.x, args.weight, nullptr, /*from_running=*/false, scale_shift.data(),
                             scale_shift.data() + c, nullptr, nullptr, eps, static_cast<scalar_t*>(y));
    });
  });
}

// dwconv_bn_relu6_backward_cuda for N * H_out * W_out > 0: grad_out, x, weight, bias (may be
// null), grad_x, grad_weight and grad_bias in the dtype, grad_out and grad_x in x's layout;
// bn_weight, bn_bias, mean, invstd, grad_bn_weight and grad_bn_bias float32.
int emu_dwconv_backward(int dtype, const void* grad_out, const void* x, const void* weight, const void* bias,
                        const float* bn_weight, const float* bn_bias, const float* mean, const float* invstd,
                        void* grad_x, void* grad_weight, void* grad_bias, float* grad_bn_weight, float* grad_bn_bias,
                        int64_t n, int64_t c, int64_t h, int64_t w, int stride, int pad, int channels_last,
                        int training, int sm_count, int64_t reduce_min_chunk, int force_int64_index) {
  return guarded([&] {
    const Problem p = make_problem(n, c, h, w, stride, pad, channels_last != 0);
    const LaunchSwitches s = switches(reduce_min_chunk, force_int64_index);
    const ReducePlan plan_sums = plan_reduce(p, kBackwardSums, sm_count, s);
    const ReducePlan plan_grads = plan_reduce(p, kBackwardGrads, sm_count, s);
    const Launch per_channel = plan_per_channel(p);
    const GradInputPlan plan_gx = plan_grad_input(p, s);
    std::vector<float> coef = scratch(c * 3);
    std::vector<float> gz = scratch(output_positions(p) * c);
    std::vector<float> slots_sums = scratch(plan_sums.splits * c * plan_sums.slot_width);
    std::vector<float> slots_grads = scratch(plan_grads.splits * c * plan_grads.slot_width);
    dispatch_dtype(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      ReduceArgs<scalar_t> args{};
      args.x = static_cast<const scalar_t*>(x);
      args.weight = static_cast<const scalar_t*>(weight);
      args.bias = static_cast<const scalar_t*>(bias);
      args.grad_out = static_cast<const scalar_t*>(grad_out);
      args.bn_weight = bn_weight;
      args.bn_bias = bn_bias;
      args.mean = mean;
      args.invstd = invstd;
      args.positions = plan_sums.positions;
      args.chunk = plan_sums.chunk;

      args.slots = slots_sums.data();
      launch_reduce<scalar_t, kBackwardSums>(p, plan_sums, args);
      run(per_channel, [&] {
        dwconv_finalize_bn_grads_kernel(slots_sums.data(), plan_sums.splits, p.g.channels,
                                        static_cast<double>(plan_sums.positions), training != 0, bn_weight, invstd,
                                        grad_bn_weight, grad_bn_bias, coef.data());
      });

      args.coef = coef.data();
      args.gz = gz.data();
      args.chunk = plan_grads.chunk;
      args.slots = slots_grads.data();
      launch_reduce<scalar_t, kBackwardGrads>(p, plan_grads, args);
      run(per_channel, [&] {
        dwconv_finalize_conv_grads_kernel<scalar_t>(slots_grads.data(), plan_grads.splits, p.g.channels,
                                                    static_cast<scalar_t*>(grad_weight),
                                                    static_cast<scalar_t*>(grad_bias));
      });

      dispatch_index_and_layout(plan_gx.launch.int64_index, p.channels_last, [&](auto index_tag, auto cl_tag) {
        using index_t = decltype(index_tag);
        constexpr bool kCL = decltype(cl_tag)::value;
        run(plan_gx.launch, [&] {
          dwconv_grad_input_kernel<scalar_t, index_t, kCL>(gz.data(), args.weight, static_cast<scalar_t*>(grad_x),
                                                           p.g, static_cast<index_t>(plan_gx.total));
        });
      });
    });
  });
}

}  // extern "C"

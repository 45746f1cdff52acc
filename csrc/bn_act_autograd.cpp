// Autograd of fercuda::batch_norm_act and fercuda::batch_norm_act_train (every device), whose
// backward is fercuda::batch_norm_act_backward: in C++, so a training step pays the autograd
// engine's bookkeeping only (torch.library.register_autograd's Python forward and backward cost
// about 0.1 ms a step, more than the kernels at the network's smaller shapes). The Triton ops
// (suffix _triton) keep their Python registration (fercuda/_autograd.py), the same formulas.
//
// y = act(batch_norm(x)) + residual: the residual's gradient is grad_out itself; the statistics
// outputs of the training op are not differentiable; eps and momentum are not differentiated. In
// inference (frozen BatchNorm) the running statistics are constants of the graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fercuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Train5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const auto& inference_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fercuda::batch_norm_act", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, bool, double)>();
  return op;
}

const auto& train_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fercuda::batch_norm_act_train", "")
          .typed<Train5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const std::optional<at::Tensor>&, bool, double, double)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fercuda::batch_norm_act_backward", "")
                             .typed<Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op;
}

// Gradients of (x, weight, bias, running_mean, running_var, residual), then undefined ones for the
// `rest` non-tensor arguments.
variable_list input_grads(const Grads3& grads, const at::Tensor& grad_out, bool has_residual, int rest) {
  variable_list out{std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), at::Tensor(), at::Tensor(),
                    has_residual ? grad_out : at::Tensor()};
  out.resize(out.size() + rest);
  return out;
}

struct BnActTrain : public torch::autograd::Function<BnActTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                               const std::optional<at::Tensor>& residual, bool relu6, double eps, double momentum) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, save_mean, save_invstd, new_mean, new_var] =
        train_op().call(x, weight, bias, running_mean, running_var, residual, relu6, eps, momentum);
    ctx->save_for_backward({x, weight, bias, save_mean, save_invstd});
    ctx->saved_data["relu6"] = relu6;
    ctx->saved_data["residual"] = residual.has_value();
    ctx->mark_non_differentiable({save_mean, save_invstd, new_mean, new_var});
    return {y, save_mean, save_invstd, new_mean, new_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const bool has_residual = ctx->saved_data["residual"].toBool();
    if (!grad_out.defined()) return variable_list(9);
    const variable_list saved = ctx->get_saved_variables();
    const Grads3 grads = backward_op().call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4],
                                            ctx->saved_data["relu6"].toBool(), /*training=*/true);
    return input_grads(grads, grad_out, has_residual, 3);
  }
};

// float32 statistics, or float64 for float64 ones: half-precision running statistics are widened so
// invstd is not rounded twice.
at::ScalarType stats_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct BnActEval : public torch::autograd::Function<BnActEval> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& running_mean, const at::Tensor& running_var,
                            const std::optional<at::Tensor>& residual, bool relu6, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = inference_op().call(x, weight, bias, running_mean, running_var, residual, relu6, eps);
    ctx->save_for_backward({x, weight, bias, running_mean, running_var});
    ctx->saved_data["relu6"] = relu6;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["residual"] = residual.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const bool has_residual = ctx->saved_data["residual"].toBool();
    if (!grad_out.defined()) return variable_list(8);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor mean = saved[3].to(stats_dtype(saved[3]));
    const at::Tensor invstd = at::rsqrt(saved[4].to(stats_dtype(saved[4])) + ctx->saved_data["eps"].toDouble());
    const Grads3 grads = backward_op().call(grad_out, saved[0], saved[1], saved[2], mean, invstd,
                                            ctx->saved_data["relu6"].toBool(), /*training=*/false);
    return input_grads(grads, grad_out, has_residual, 2);
  }
};

Train5 batch_norm_act_train_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& running_mean, const at::Tensor& running_var,
                                     const std::optional<at::Tensor>& residual, bool relu6, double eps,
                                     double momentum) {
  const variable_list out =
      BnActTrain::apply(x, weight, bias, running_mean, running_var, residual, relu6, eps, momentum);
  return {out[0], out[1], out[2], out[3], out[4]};
}

at::Tensor batch_norm_act_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const std::optional<at::Tensor>& residual, bool relu6, double eps) {
  return BnActEval::apply(x, weight, bias, running_mean, running_var, residual, relu6, eps);
}

}  // namespace
}  // namespace fercuda

TORCH_LIBRARY_IMPL(fercuda, Autograd, m) {
  m.impl("batch_norm_act", &fercuda::batch_norm_act_autograd);
  m.impl("batch_norm_act_train", &fercuda::batch_norm_act_train_autograd);
}

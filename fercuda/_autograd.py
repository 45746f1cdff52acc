"""Autograd of the fused depthwise conv + BatchNorm + ReLU6 ops and of the BatchNorm + activation
+ residual add ops.

The backward is itself a registered op (fercuda::dwconv_bn_relu6_backward), so
torch.compile traces it like any other op instead of falling back to eager. The Triton ops
(fercuda/triton/dwconv.py) share the C++ ops' contract, so the same registration serves them,
calling their own backward op.
"""

import functools

import torch


def _stats_dtype(t):
    # Half-precision running statistics are widened so invstd is not rounded twice.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grads(ctx, grads):
    grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b = grads
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), grad_bn_w, grad_bn_b


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, _running_mean, _running_var, stride, padding, _eps, _momentum = inputs
    _out, save_mean, save_invstd, _new_mean, _new_var, save_z = output
    ctx.has_bias = bias is not None
    ctx.stride, ctx.padding = stride, padding
    # save_z: the conv output, which the backward reads instead of computing it again (empty
    # where the backend does not keep it).
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, save_mean, save_invstd, save_z)
    ctx.out_meta = (_out.shape, _out.dtype, _out.device, _out.stride())
    # Only out is differentiated: no zero gradients materialized for the other outputs (save_z
    # is as large as out).
    ctx.set_materialize_grads(False)


def _train_backward(backward_op, ctx, grad_out, *_grad_outputs):
    x, weight, bias, bn_weight, bn_bias, mean, invstd, z = ctx.saved_tensors
    if grad_out is None:  # out unused: a zero gradient
        shape, dtype, device, stride = ctx.out_meta
        grad_out = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
    grads = backward_op(
        grad_out, x, weight, bias, bn_weight, bn_bias, mean, invstd, ctx.stride, ctx.padding, True, z
    )
    # The statistics outputs and the running_mean / running_var inputs are not differentiated.
    return (*_grads(ctx, grads), None, None, None, None, None, None)


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, eps = inputs
    ctx.has_bias = bias is not None
    ctx.stride, ctx.padding, ctx.eps = stride, padding, eps
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var)


def _eval_backward(backward_op, ctx, grad_out):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = ctx.saved_tensors
    # Frozen BatchNorm: the running statistics are constants of the graph.
    mean = running_mean.to(_stats_dtype(running_mean))
    invstd = torch.rsqrt(running_var.to(_stats_dtype(running_var)) + ctx.eps)
    grads = backward_op(
        grad_out, x, weight, bias, bn_weight, bn_bias, mean, invstd, ctx.stride, ctx.padding, False
    )
    return (*_grads(ctx, grads), None, None, None, None, None)


def register_dwconv_autograd(suffix):
    """Autograd of fercuda::dwconv_bn_relu6{suffix} and _train{suffix}, whose backward is
    fercuda::dwconv_bn_relu6_backward{suffix}."""
    backward_op = getattr(torch.ops.fercuda, f"dwconv_bn_relu6_backward{suffix}")
    torch.library.register_autograd(f"fercuda::dwconv_bn_relu6_train{suffix}",
                                    functools.partial(_train_backward, backward_op), setup_context=_train_setup_context)
    torch.library.register_autograd(f"fercuda::dwconv_bn_relu6{suffix}", functools.partial(_eval_backward, backward_op),
                                    setup_context=_eval_setup_context)


register_dwconv_autograd("")


# ---- BatchNorm + ReLU6 (or identity) + residual add ------------------------------------------


def _bn_act_grads(ctx, grad_out, grads):
    grad_x, grad_w, grad_b = grads
    # y = act(batch_norm(x)) + residual: the residual's gradient is grad_out.
    return grad_x, grad_w, grad_b, None, None, (grad_out if ctx.has_residual else None), None


def _bn_act_train_setup_context(ctx, inputs, output):
    x, weight, bias, _running_mean, _running_var, residual, relu6, _eps, _momentum = inputs
    _out, save_mean, save_invstd, _new_mean, _new_var = output
    ctx.has_residual = residual is not None
    ctx.relu6 = relu6
    ctx.save_for_backward(x, weight, bias, save_mean, save_invstd)


def _bn_act_train_backward(backward_op, ctx, grad_out, *_grad_statistics):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    grads = backward_op(grad_out, x, weight, bias, mean, invstd, ctx.relu6, True)
    # eps and momentum are not differentiated.
    return (*_bn_act_grads(ctx, grad_out, grads), None, None)


def _bn_act_eval_setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, residual, relu6, eps = inputs
    ctx.has_residual = residual is not None
    ctx.relu6, ctx.eps = relu6, eps
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)


def _bn_act_eval_backward(backward_op, ctx, grad_out):
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    # Frozen BatchNorm: the running statistics are constants of the graph.
    mean = running_mean.to(_stats_dtype(running_mean))
    invstd = torch.rsqrt(running_var.to(_stats_dtype(running_var)) + ctx.eps)
    grads = backward_op(grad_out, x, weight, bias, mean, invstd, ctx.relu6, False)
    return (*_bn_act_grads(ctx, grad_out, grads), None)


def register_bn_act_autograd(suffix):
    """Autograd of fercuda::batch_norm_act{suffix} and _train{suffix}, whose backward is
    fercuda::batch_norm_act_backward{suffix}."""
    backward_op = getattr(torch.ops.fercuda, f"batch_norm_act_backward{suffix}")
    torch.library.register_autograd(f"fercuda::batch_norm_act_train{suffix}",
                                    functools.partial(_bn_act_train_backward, backward_op),
                                    setup_context=_bn_act_train_setup_context)
    torch.library.register_autograd(f"fercuda::batch_norm_act{suffix}",
                                    functools.partial(_bn_act_eval_backward, backward_op),
                                    setup_context=_bn_act_eval_setup_context)


# fercuda::batch_norm_act and _train have their autograd in C++ (csrc/bn_act_autograd.cpp, the same
# formulas): a training step then pays no Python. The Triton ops register theirs here
# (fercuda/triton/bn_act.py).

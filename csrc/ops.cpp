// Every fercuda operator's schema, declared once. Kernels register per dispatch key
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes and autograd are registered in Python
// (fercuda/_meta.py, fercuda/_autograd.py).
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "cpu/cpu_isa.h"

namespace {

// fercuda._C's functions: the CPU kernels' instruction-set path (csrc/cpu/cpu_isa.h), for
// fercuda.cpu_isa() and fercuda.set_cpu_isa().
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fercuda::cpu::isa_name(fercuda::cpu::active_isa()));
}

PyObject* cpu_isas(PyObject*, PyObject*) {
  const auto isas = fercuda::cpu::supported_isas();
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(isas.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i)
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), PyUnicode_FromString(fercuda::cpu::isa_name(isas[i])));
  return out;
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    return PyUnicode_FromString(fercuda::cpu::set_isa(name).c_str());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernels' instruction-set path."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The instruction-set paths this CPU can run."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Forces a path by name; returns the previous one."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing fercuda._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  try {
    fercuda::cpu::active_isa();  // FERCUDA_CPU_ISA is read now: a bad value fails the import.
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fercuda, m) {
  // ---- Canny family. Images are uint8 shaped (H, W), (N, H, W) or (N, 1, H, W);
  // every output keeps the input's shape.
  // cv2.GaussianBlur(img, (ksize, ksize), 0), reflect-101 border; ksize in {3, 5, 7}.
  m.def("gaussian_blur(Tensor img, int ksize=5) -> Tensor");
  // cv2.Sobel(img, CV_16S, 1, 0 / 0, 1, ksize=3, borderType=BORDER_REPLICATE) -> (dx, dy) int16.
  m.def("sobel(Tensor img) -> (Tensor, Tensor)");
  // The 2x2 finite differences P, Q of the paper's eq. (2), float32.
  m.def("paper_gradient(Tensor img) -> (Tensor, Tensor)");
  // Non-maximum suppression and double threshold: uint8 map, 0 = not an edge,
  // 1 = weak candidate, 2 = strong edge. From int16 (dx, dy).
  m.def("nms(Tensor dx, Tensor dy, float low, float high, bool l2_gradient=False) -> Tensor");
  // 8-connected hysteresis over an nms() map: uint8, 255 = edge, 0 elsewhere.
  m.def("hysteresis(Tensor edge_map) -> Tensor");
  // The whole pipeline in one pass per image; ksize=0 skips the blur.
  m.def(
      "canny(Tensor img, float low=50, float high=150, int ksize=5, bool l2_gradient=False, "
      "str gradient=\"sobel\") -> Tensor");

  // ---- Fused depthwise 3x3 conv + BatchNorm + ReLU6. x: (N, C, H, W), NCHW or channels_last;
  // weight (C, 1, 3, 3); bias, bn_*, running_*: (C,). float32, float16, bfloat16 (float32
  // accumulation); the BatchNorm tensors may be float32 when x is half precision.
  // Inference: BatchNorm with the running statistics, folded into the convolution.
  m.def(
      "dwconv_bn_relu6(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor running_mean, Tensor running_var, int stride=1, int padding=1, float eps=1e-5) -> Tensor");
  // Training: batch statistics. Returns (out, save_mean, save_invstd, new_running_mean,
  // new_running_var, save_z): save_mean / save_invstd float32 (C,) for the backward (float64
  // where x is float64); new_running_* the running statistics updated as nn.BatchNorm2d does
  // (momentum, unbiased variance), in the dtype of running_mean / running_var; save_z the conv
  // output conv(x, weight) + bias in the statistics' dtype and out's shape and layout, which the
  // backward reads instead of computing the conv again, where the CPU kernels keep it
  // (channels_last float32 and bfloat16, at most 2M values: csrc/cpu/dwconv_cpu_paths.h), else
  // an empty (0,) tensor, and the backward computes it. The op is functional (torch.library.register_autograd refuses
  // ops that mutate their inputs); fercuda.ops.dwconv_bn_relu6 copies the new statistics into
  // the buffers.
  m.def(
      "dwconv_bn_relu6_train(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
      "Tensor running_mean, Tensor running_var, int stride=1, int padding=1, float eps=1e-5, "
      "float momentum=0.1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients (x, weight, bias, bn_weight, bn_bias) from grad_out. training=True: mean/invstd
  // are the saved batch statistics and flow into the gradient; training=False: they are the
  // running statistics (invstd = 1/sqrt(running_var + eps)), constants. z: the train op's
  // save_z, or None (the conv is computed again; so is it where a backend does not read z).
  // grad_bias has shape (C,) even where bias is None.
  m.def(
      "dwconv_bn_relu6_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, "
      "Tensor bn_bias, Tensor mean, Tensor invstd, int stride, int padding, bool training, Tensor? z=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- BatchNorm + ReLU6 (relu6=False: no activation) + an optional residual added, what follows
  // a conv: y = act(batch_norm(x)) + residual. x: (N, C, H, W), NCHW or channels_last (y keeps
  // it); weight, bias, running_*: (C,); residual: x's shape and dtype. float32, float16, bfloat16
  // (float32 accumulation; weight, bias and the statistics may be float32 when x is half
  // precision), float64 on the CPU.
  // Inference: BatchNorm with the running statistics, one pass.
  m.def(
      "batch_norm_act(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "Tensor? residual=None, bool relu6=True, float eps=1e-5) -> Tensor");
  // Training: batch statistics, two passes (statistics; normalize, activation, add). Returns
  // (out, save_mean, save_invstd, new_running_mean, new_running_var) as dwconv_bn_relu6_train does:
  // functional, fercuda.ops.batch_norm_act copies the new statistics into the buffers.
  m.def(
      "batch_norm_act_train(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "Tensor? residual=None, bool relu6=True, float eps=1e-5, float momentum=0.1) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients (x, weight, bias) from grad_out (the residual's is grad_out itself). training=True:
  // mean / invstd are the saved batch statistics and flow into grad_x; training=False: the running
  // statistics (invstd = 1/sqrt(running_var + eps)), constants.
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor invstd, bool relu6, bool training) -> (Tensor, Tensor, Tensor)");
}

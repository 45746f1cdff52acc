// Every fercuda operator's schema, declared once. Kernels register per dispatch key
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes and autograd are registered in Python
// (fercuda/_meta.py, fercuda/_autograd.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fercuda._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
}

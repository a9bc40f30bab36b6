// Schemas of every C++/CUDA op, in one place. Kernels register per dispatch key
// in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake tensors and autograd live in umae/*.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(umae, m) {
  // imgs (N, C, H, W) -> (N, L, p*p*C), last dim ordered (row-in-patch, col-in-patch, channel).
  m.def("patchify(Tensor imgs, int p) -> Tensor");
  // x (N, L, p*p*C) -> (N, C, h*p, w*p) with L == h*w; the exact inverse of patchify.
  m.def("unpatchify(Tensor x, int p, int h, int w, int c) -> Tensor");
  // Per-patch squared error (N, L) in fp32 between pred (N, L, K) and the (optionally
  // per-patch normalized) target. patch_size == 0: target is patchified (N, L, K);
  // patch_size > 0: target is the image batch (N, C, H, W), patchified on the fly.
  // norm_pix divides by sqrt(unbiased var + eps); eps is given by the caller (umae/masked_mse_op.py).
  m.def("patch_mse(Tensor pred, Tensor target, int patch_size, bool norm_pix, float eps) -> Tensor");
  // d(sum(grad_rows * patch_mse)) / d(pred), in pred's dtype.
  m.def("patch_mse_backward(Tensor grad_rows, Tensor pred, Tensor target, int patch_size, bool norm_pix, "
        "float eps) -> Tensor");
}

// The module is loaded for its op registrations; Python needs an init symbol.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

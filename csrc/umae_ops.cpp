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

  // C++ (CPU) kernels of the three token ops whose GPU kernels are Triton (custom ops of the same
  // name without `_cpp`, registered from Python). Semantics: umae/<op>_op.py's references.
  // x (N, L, D), noise (N, L) -> (x_masked (N, c + len_keep, D), mask (N, L) fp32, ids_restore (N, L) int64).
  m.def("random_masking_cpp(Tensor x, Tensor noise, Tensor? pos_embed, Tensor? cls_token, int len_keep) "
        "-> (Tensor, Tensor, Tensor)");
  // -> (grad of x + pos (N, L, D) in grad_out's dtype, its sum over N (L, D) fp32 if need_pos, else (0, D)).
  m.def("random_masking_cpp_backward(Tensor grad_out, Tensor ids_restore, bool has_cls, bool need_pos) "
        "-> (Tensor, Tensor)");
  // x (N, c + len_keep, D) -> (N, c + L, D): kept tokens at their positions, the mask token elsewhere.
  m.def("restore_tokens_cpp(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed, bool has_cls) "
        "-> Tensor");
  // -> (grad x (N, len_x, D) in grad_out's dtype, grad mask_token (D,) fp32, grad pos (c + L, D) fp32 or (0, D)).
  m.def("restore_tokens_cpp_backward(Tensor grad_out, Tensor ids_restore, int len_x, bool has_cls, bool need_pos) "
        "-> (Tensor, Tensor, Tensor)");
  // features (B, D) -> the uniformity loss, a 0-dim fp32 (fp64 for fp64 features) tensor.
  // eps: the normalization's (F.normalize's), given by the caller (umae/uniformity_op.py).
  m.def("uniformity_loss_cpp(Tensor features, bool normalize, bool exclude_diagonal, float eps) -> Tensor");
  // -> (the loss, its gradient dL/dfeatures for an upstream gradient of 1, fp32 (fp64) (B, D)): what
  // the op's autograd (registered in C++) runs when features need a gradient.
  m.def("uniformity_loss_cpp_with_grad(Tensor features, bool normalize, bool exclude_diagonal, float eps) "
        "-> (Tensor, Tensor)");
}

// The module is loaded for its op registrations; Python needs an init symbol.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

// The umae namespace of torch.ops, owned here; each op's schemas are defined beside its CPU kernel
// (csrc/cpu/<op>.cpp, TORCH_LIBRARY_FRAGMENT) with its autograd, its CUDA kernel registers in
// csrc/cuda/<op>.cu or, for the Triton ops, from umae/ops/<op>_op.py, where its fake tensors are.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(umae, m) {
  // `grads` (a backward's results, computed without autograd) as functions of `deps` whose own backward
  // raises naming `op` (csrc/common.h first_order_only): the Python autograd Functions' way to the
  // same refusal as the C++ ones' (umae/ops/uniformity_op.py, across ranks). With grad mode off, `grads`.
  m.def("first_order_only(str op, Tensor[] grads, Tensor[] deps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(umae, CompositeImplicitAutograd, m) {
  m.impl("first_order_only", [](c10::string_view op, at::TensorList grads, at::TensorList deps) {
    return umae::first_order_only(std::string(op), grads.vec(), deps);
  });
}

// The module is loaded for its op registrations; Python needs an init symbol.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

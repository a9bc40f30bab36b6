// The umae namespace of torch.ops, owned here; each op's schemas are defined beside its CPU kernel
// (csrc/cpu/<op>.cpp, TORCH_LIBRARY_FRAGMENT), its CUDA kernel registers in csrc/cuda/<op>.cu or,
// for the Triton ops, from umae/ops/<op>_op.py; fake tensors and autograd live in umae/ops/<op>_op.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(umae, m) {}

// The module is loaded for its op registrations; Python needs an init symbol.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

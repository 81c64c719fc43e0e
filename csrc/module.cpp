// module.cpp — makes the shared library importable as the Python module kdkernels._C.
// It defines no Python functions: importing it runs the TORCH_LIBRARY registrations of ops.cpp (and of
// cuda/binding.cpp in CUDA builds); everything is then reached through torch.ops.kdkernels.*.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "kdkernels C++ ops (torch.ops.kdkernels)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

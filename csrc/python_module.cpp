// A do-nothing Python module so that `import kdkernels._C` / `import kdkernels._C_cuda` loads
// the shared library; the library's static initialisers register the ops with the dispatcher.
// The name comes from setup.py (KDKERNELS_MODULE_NAME) so one source serves both modules.
#include <Python.h>

#define KDK_CONCAT_(a, b) a##b
#define KDK_CONCAT(a, b) KDK_CONCAT_(a, b)
#define KDK_STR_(a) #a
#define KDK_STR(a) KDK_STR_(a)

extern "C" PyMODINIT_FUNC KDK_CONCAT(PyInit_, KDKERNELS_MODULE_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, KDK_STR(KDKERNELS_MODULE_NAME),
                                      "kdkernels native kernels (ops live in torch.ops.kdkernels)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}

// `import torch_ar._C` loads this shared library; its static initialisers
// register the torch_ar operators with the dispatcher (torch.ops.torch_ar.*).
// The module object itself is empty.

#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                            // m_name
      "torch_ar native operators, reached through torch.ops.torch_ar", // m_doc
      -1,                                                              // m_size
      nullptr,                                                         // m_methods
  };
  return PyModule_Create(&module_def);
}

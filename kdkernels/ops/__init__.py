"""Dispatcher ops with their fake (meta) and autograd registrations, one module per loss family.

C++ ops (``torch.ops.kdkernels.<op>``) get their CPU/CUDA kernels from the extension modules;
Triton ops are ``torch.library.custom_op``s named ``kdkernels::<op>_triton`` with the same schema.
"""
from kdkernels.ops import feature, relation, response  # noqa: F401  (registers on import)

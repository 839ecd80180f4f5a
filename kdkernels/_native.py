"""Loads the compiled extension modules, if they were built, and remembers why not; notes whether
Triton is installed.

``kdkernels._C`` holds the CPU kernels and ``kdkernels._C_cuda`` the CUDA kernels; both only
register kernels (``TORCH_LIBRARY_IMPL``) for ops whose schemas are defined in Python, by the op
specs (kdkernels/ops/_spec.py). The CUDA module is loaded only when ``_C`` is: a build without the
CPU module is a broken build, and the CUDA module is then left out too.
"""
from __future__ import annotations

import importlib
import importlib.util

# Triton kernels are plain Python: they exist wherever the triton package is installed.
triton_installed = importlib.util.find_spec("triton") is not None

cpu_loaded = False
cuda_loaded = False
cpu_error: str | None = None
cuda_error: str | None = None

try:
    importlib.import_module("kdkernels._C")
    cpu_loaded = True
except ImportError as exc:  # not built (e.g. a source checkout without `pip install -e .`)
    cpu_error = str(exc)

if cpu_loaded:
    try:
        importlib.import_module("kdkernels._C_cuda")
        cuda_loaded = True
    except ImportError as exc:  # built without nvcc / with KDKERNELS_SKIP_CUDA=1 / CPU-only torch
        cuda_error = str(exc)
else:
    cuda_error = "kdkernels._C is not built (the CUDA module is loaded only with it)"

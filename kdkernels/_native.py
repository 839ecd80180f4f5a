"""Loads the compiled extension modules, if they were built, and remembers why not; notes whether
Triton is installed.

``kdkernels._C`` holds every op schema and the CPU kernels; ``kdkernels._C_cuda`` the CUDA
kernels, registered under the same op names. The CUDA module is loaded only after ``_C``
(its kernels implement ops that ``_C`` defines).
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
    cuda_error = "kdkernels._C (which defines the ops) is not built"

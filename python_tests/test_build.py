"""The build facts of docs/design.md §3: on a machine with nvcc and a CUDA torch the CUDA module must exist."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils import cpp_extension

from kdkernels import _native


def test_cpu_extension_built():
    assert _native.cpu_loaded, f"kdkernels._C did not load: {_native.cpu_error}"


def test_cuda_extension_built_when_nvcc_present():
    home = cpp_extension.CUDA_HOME
    nvcc = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if not nvcc or torch.version.cuda is None or os.environ.get("KDKERNELS_SKIP_CUDA") == "1":
        pytest.skip("no nvcc / CPU-only torch / KDKERNELS_SKIP_CUDA=1: the CUDA module is not expected")
    assert _native.cuda_loaded, f"nvcc is present but kdkernels._C_cuda did not load: {_native.cuda_error}"

"""Build kdkernels' two extension modules.

* ``kdkernels._C``      C++ CPU kernels only (``csrc/cpu/**/*.cpp``). Always built.
* ``kdkernels._C_cuda`` C++/CUDA kernels (``csrc/cuda/**/*.cu``). Built when nvcc and a CUDA build of
  torch are present, decided without ``torch.cuda.is_available()`` so it builds on machines without
  a GPU. Set ``KDKERNELS_SKIP_CUDA=1`` to skip it. ``TORCH_CUDA_ARCH_LIST`` defaults to Hopper (9.0),
  ``CUDA_HOME`` to /usr/local/cuda.

Neither module defines a schema: the op schemas are defined in Python (kdkernels/ops), and the C++
files only register kernels for them (``TORCH_LIBRARY_IMPL``). Both modules also compile
``csrc/python_module.cpp``, the empty Python module whose import loads the library (its name comes
from ``KDKERNELS_MODULE_NAME``). Sources are one op per file (``csrc/{cpu,cuda}/<family>/<op>.*``),
found by recursive glob: a rebuild of one op recompiles one translation unit per backend.

Install with ``pip install -e . --no-build-isolation`` (an isolated build would fetch another torch).
"""
import glob
import os

# torch.utils.cpp_extension reads CUDA_HOME when imported; without it, it derives the toolkit from
# the nvcc on PATH, which on some machines is a wrapper in /usr/local/bin (=> no libcudart).
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _sources(backend, pattern):
    """csrc/<backend>/**/<pattern>, recursively, plus the module init every extension needs."""
    found = glob.glob(os.path.join(ROOT, "csrc", backend, "**", pattern), recursive=True)
    return _rel(found + [os.path.join(ROOT, "csrc", "python_module.cpp")])


def cuda_build_wanted() -> bool:
    if os.environ.get("KDKERNELS_SKIP_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None:  # CPU-only torch: nothing to link a CUDA module against
        return False
    home = cpp_extension.CUDA_HOME
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def extensions():
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.14 headers need C++20
    exts = [
        cpp_extension.CppExtension(
            "kdkernels._C",
            _sources("cpu", "*.cpp"),
            include_dirs=INCLUDE,
            define_macros=[("KDKERNELS_MODULE_NAME", "_C")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if cuda_build_wanted():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        exts.append(
            cpp_extension.CUDAExtension(
                "kdkernels._C_cuda",
                _sources("cuda", "*.cu"),
                include_dirs=INCLUDE,
                define_macros=[("KDKERNELS_MODULE_NAME", "_C_cuda")],
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            )
        )
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

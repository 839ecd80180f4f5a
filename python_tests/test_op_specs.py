"""The op specs (kdkernels/ops/_spec.py) are the single source of every op's schema and backend set."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from kdkernels import _native, backends, functional, ops, reference
from kdkernels.ops._spec import NAMESPACE

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = [("native", ""), ("triton", "_triton")]


def _variant_ops(op, variant):
    backend = "triton" if variant == "triton" else "cpu"
    return op.forward_ops[backend], op.backward_ops[backend]


@pytest.mark.parametrize("op", ops.ALL_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("variant,suffix", VARIANTS)
def test_registered_schema_is_the_spec(op, variant, suffix):
    forward, backward = _variant_ops(op, variant)
    assert str(forward._schema) == f"{NAMESPACE}::{op.name}_forward{suffix}{op.spec.forward_schema}"
    assert str(backward._schema) == f"{NAMESPACE}::{op.name}_backward{suffix}{op.spec.backward_schema}"


@pytest.mark.skipif(not _native.cpu_loaded, reason=f"C++ extension not built: {_native.cpu_error}")
@pytest.mark.parametrize("op", ops.ALL_OPS, ids=lambda op: op.name)
def test_cpp_modules_register_kernels_for_every_native_op(op):
    keys = ["CPU"] + (["CUDA"] if _native.cuda_loaded else [])
    for overload in _variant_ops(op, "native"):
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), key), (overload.name(), key)


@pytest.mark.skipif(not _native.triton_installed, reason="triton is not installed")
@pytest.mark.parametrize("op", ops.ALL_OPS, ids=lambda op: op.name)
def test_triton_variant_has_cpu_and_cuda_kernels(op):
    for overload in _variant_ops(op, "triton"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), key), (overload.name(), key)


def test_no_schema_is_defined_in_cpp():
    # the C++ files register kernels only; a TORCH_LIBRARY(...) / m.def(...) would be a second schema
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                 if p.suffix in (".cpp", ".cu", ".h", ".cuh")
                 and re.search(r"TORCH_LIBRARY\s*\(|\bm\.def\s*\(", p.read_text())]
    assert offenders == []


def test_backend_table_comes_from_the_specs():
    # the loss list lives in backends.LOSS_OPS; the public namespaces must agree with it
    assert set(backends.LOSSES) == set(functional.__all__) == set(reference.__all__)
    for loss, loss_ops in backends.LOSS_OPS.items():
        fused = set.intersection(*(set(op.backends) for op in loss_ops))
        assert backends.IMPLEMENTED[loss] == frozenset(fused | {"torch"})


def test_every_op_is_used_by_a_loss():
    used = {op.name for loss_ops in backends.LOSS_OPS.values() for op in loss_ops}
    assert used == {op.name for op in ops.ALL_OPS}

"""One declarative spec per fused op (``OpDef``) and the one call that registers it (``register``).

An ``OpDef`` describes a differentiable fused op: a forward op and the backward op its autograd
formula calls. ``register(spec)`` turns it into dispatcher ops, all from the spec's two schemas:

* ``kdkernels::<name>_forward`` / ``<name>_backward``: the C++ variant. Its kernels come from the
  extension modules, which only *register kernels* for these names
  (``TORCH_LIBRARY_IMPL(kdkernels, CPU / CUDA, m)`` in csrc/{cpu,cuda}/<family>/<name>.*): the schema
  lives here alone, and the dispatcher checks every C++ kernel's signature against it when both are
  loaded (a mismatch fails ``import kdkernels``).
* ``kdkernels::<name>_forward_triton`` / ``<name>_backward_triton``: the Triton variant, same schemas;
  its kernels are the launchers ``forward`` / ``backward`` of the spec's ``triton_module``, imported on
  first use (Triton reads ``TRITON_INTERPRET`` when it is first imported), for CUDA tensors and, under
  the interpreter, CPU tensors.

Both variants get the spec's fake kernels (shapes for ``torch.compile`` / meta tensors) and its
autograd formula. ``register`` returns an ``Op``: the single entry the functional layer calls
(``op.forward(backend, *args)``), and the set of backends that implement the op, which feeds the
backend table (kdkernels.backends).

Why custom ops and not ``torch.library.triton_op``: see docs/decisions.md ("Triton variants are
opaque custom ops").
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdkernels import _native

# The dispatcher namespace of every op. FRAGMENT: each family module adds its ops to it.
NAMESPACE = "kdkernels"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")

NATIVE_BACKENDS = ("cpu", "cuda")  # kernels from kdkernels._C / kdkernels._C_cuda, one op name for both
FUSED_BACKENDS = NATIVE_BACKENDS + ("triton",)
_TRITON_DISPATCH_KEYS = ("CPU", "CUDA")  # CPU: only under TRITON_INTERPRET=1 (kdkernels.backends checks)


@dataclass(frozen=True)
class OpDef:
    """Everything about one fused op, in one place.

    name:            ``softmax_kl`` -> ops ``kdkernels::softmax_kl_forward`` / ``_backward`` (+ ``_triton``)
    forward_schema:  the forward's arguments and results, e.g. ``"(Tensor x, float s) -> (Tensor, Tensor)"``
    backward_schema: the backward's; it may mutate (``Tensor(a!)``) gradients the forward computed and
                     saved, which the formula then returns (one-pass ops: docs/decisions.md)
    forward_fake:    the forward's fake kernel (output shapes / dtypes from input metadata)
    backward_fake:   the backward's fake kernel
    setup_context:   ``(ctx, inputs, output)``: saves what the backward needs, nothing more
    backward:        ``(backward_op, ctx, *grad_outputs) -> grads of the forward's inputs``: the autograd
                     formula, given the backward op of the variant being differentiated
    triton_module:   module of the Triton launchers ``forward`` / ``backward`` (same arguments as the schemas)
    backends:        the fused backends that have kernels for this op
    doc:             what the arguments and results mean (shown by ``help`` on the Op)
    """

    name: str
    forward_schema: str
    backward_schema: str
    forward_fake: Callable
    backward_fake: Callable
    setup_context: Callable
    backward: Callable
    triton_module: str
    backends: frozenset[str] = field(default=frozenset(FUSED_BACKENDS))
    doc: str = ""


class Op:
    """A registered ``OpDef``: ``forward(backend, *args)`` runs the forward op of ``backend``."""

    def __init__(self, spec: OpDef, forward_ops: dict[str, torch._ops.OpOverload],
                 backward_ops: dict[str, torch._ops.OpOverload]):
        self.spec = spec
        self.name = spec.name
        self.backends = spec.backends
        self.forward_ops = forward_ops  # backend -> OpOverload
        self.backward_ops = backward_ops
        self.__doc__ = spec.doc

    def forward(self, backend: str, *args):
        """The forward op of ``backend`` ("cpu", "cuda" or "triton") applied to ``args``."""
        return self.forward_ops[backend](*args)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={sorted(self.backends)})"


def _triton_launcher(module: str, function: str) -> Callable:
    """A kernel that imports the Triton launcher module on its first call."""

    def launch(*args):
        return getattr(importlib.import_module(module), function)(*args)

    launch.__name__ = f"{module}.{function}"
    return launch


def _define(op_name: str, schema: str) -> torch._ops.OpOverload:
    _LIBRARY.define(op_name + schema)
    return getattr(getattr(torch.ops, NAMESPACE), op_name).default


def _register_variant(spec: OpDef, suffix: str) -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
    forward_name, backward_name = f"{spec.name}_forward{suffix}", f"{spec.name}_backward{suffix}"
    forward_op = _define(forward_name, spec.forward_schema)
    backward_op = _define(backward_name, spec.backward_schema)
    if suffix and _native.triton_installed:
        for key in _TRITON_DISPATCH_KEYS:
            _LIBRARY.impl(forward_name, _triton_launcher(spec.triton_module, "forward"), key)
            _LIBRARY.impl(backward_name, _triton_launcher(spec.triton_module, "backward"), key)
    torch.library.register_fake(forward_op)(spec.forward_fake)
    torch.library.register_fake(backward_op)(spec.backward_fake)
    torch.library.register_autograd(forward_op, functools.partial(_backward, spec, backward_op),
                                    setup_context=spec.setup_context)
    if not backward_op._schema.is_mutable:
        # Differentiating the backward (create_graph=True, then a second backward) is not supported:
        # say so, instead of the silent None / zero gradients an op without autograd would give. (A
        # mutating backward op, which scales gradients the forward saved, only ever sees tensors that
        # need no gradient; torch.library gives no autograd to mutating ops.)
        torch.library.register_autograd(backward_op, functools.partial(_no_double_backward, spec.name))
    return forward_op, backward_op


def _double_backward_error(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"kdkernels op {name!r}: double backward (differentiating a gradient, e.g. torch.autograd.grad(..., "
        f"create_graph=True) followed by another backward) is not supported by the fused backends; use "
        f"backend='torch' for that loss")


def _no_double_backward(name: str, ctx, *grads):
    raise _double_backward_error(name)


def _backward(spec: OpDef, backward_op, ctx, *grads):
    """The spec's autograd formula, which never hands create_graph=True a gradient it cannot differentiate.

    A gradient computed only from saved, non-differentiable state (e.g. projected_mse's grad_x from
    the residual when the weight needs no gradient) would not require grad: a later backward through
    it would silently miss its second-order terms. Such a gradient raises here instead.
    """
    result = spec.backward(backward_op, ctx, *grads)
    if torch.is_grad_enabled():  # only under create_graph=True
        for grad, needed in zip(result, ctx.needs_input_grad):
            if needed and grad is not None and not grad.requires_grad:
                raise _double_backward_error(spec.name)
    return result


def register(spec: OpDef) -> Op:
    """Define the C++ and Triton variants of ``spec`` with their fake kernels and autograd."""
    native_forward, native_backward = _register_variant(spec, "")
    triton_forward, triton_backward = _register_variant(spec, "_triton")
    forward = {b: native_forward for b in NATIVE_BACKENDS if b in spec.backends}
    backward = {b: native_backward for b in NATIVE_BACKENDS if b in spec.backends}
    if "triton" in spec.backends:
        forward["triton"], backward["triton"] = triton_forward, triton_backward
    return Op(spec, forward, backward)

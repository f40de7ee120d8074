"""What every topo custom op shares: the group key, its live resolution, side-effect marking.

A collective reaches ``torch.ops.topo.<name>`` only when it must: its input requires grad (and
grad mode is on) or torch.compile is tracing it (:func:`needs_op`). The communicator group
travels through the op as a string key — the axis names joined by commas and the id of the
activation the call was made or traced in, e.g. ``"dp,tp@3"`` — plus the group size seen then.
The op's implementation resolves the key each time it runs (``topo.context.context_for_key``):
in the calling thread's activation where it has one, else in the activation the key names. So
a backward runs on autograd's own device threads (CUDA), in a thread the user started, and a
compiled graph runs later, in the activation it was traced in or in the caller's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from topo.active import context_for_key, find_context, group_key
from topo.communicators.base import Communicator
from topo.errors import TopoValueError
from topo.mesh import Axis

__all__: list[str] = []
#: Whether torch.compile is tracing the caller, or torch.export (non-strict export runs the
#: Python code on fake tensors with only ``torch.compiler``'s flag set: not
#: ``is_dynamo_compiling``, which would be one Python call cheaper).
_is_compiling: Callable[[], bool] = getattr(
    getattr(torch, "compiler", None), "is_compiling", lambda: False
)


def needs_op(x: object) -> bool:
    """Whether a collective on ``x`` must go through its custom op: ``x`` requires grad with
    grad mode on, or torch.compile is tracing, or ``x`` is a lazy ``conj()`` view or the
    ``.imag`` of one (its memory does not hold its values; the op path resolves it, see
    :func:`topo.communicators.base.plain`). Otherwise the plain path runs, as fast as ever."""
    if _is_compiling():  # first: dynamo cannot trace is_conj() (a bool, not a tensor)
        return True
    return isinstance(x, torch.Tensor) and (
        (x.requires_grad and torch.is_grad_enabled()) or x.is_conj() or x.is_neg()
    )


def group_of(axis: Axis, operation: str) -> tuple[str, int, int]:
    """``(key, size, index)`` of ``axis`` in the active context; torch.compile evaluates it once
    while tracing (a context variable cannot be traced) and keeps the result as a constant.
    Registers topo's custom ops on the first call (every op path passes here first)."""
    if _LAST_OP_MODULE not in sys.modules:
        from topo.ops import load

        load()
    ctx, names, n = find_context(axis, operation)
    return group_key(ctx, names), n, ctx.axis_index(names)


#: The op module ``topo.ops.load`` imports last: once it is loaded, every op is registered.
_LAST_OP_MODULE = "topo.ops.uneven"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (1.6 s)
# on every `import topo`; dynamo reads the mark when it traces a call.
group_of._dynamo_marked_constant = True  # type: ignore[attr-defined]


def live(group: str, n: int, device: str, operation: str) -> tuple[Communicator | None, int]:
    """The communicator of ``group`` in the active context (``None`` for a group of one) and
    this rank's index in it; checks that the group still has the size ``n`` seen at tracing."""
    ctx, names, size = context_for_key(group, operation)
    if size != n:
        raise TopoValueError(
            f"topo.{operation} requires axis {','.join(names)!r} to have the size {n} it had when this "
            f"call was traced (torch.compile), but the active mesh has {size}; compile the "
            f"function again for this mesh (torch._dynamo.reset())"
        )
    if n == 1:
        return None, 0
    return ctx.communicator(names, device), ctx.axis_index(names)


def mark_side_effects(op: Any) -> None:
    """Keep ``op`` in every compiled graph, in program order, even where its result is unused:
    a rank that skipped a collective would leave its peers waiting."""
    has_side_effect = getattr(torch.fx.node, "has_side_effect", None)
    if has_side_effect is not None:  # FX dead-code elimination
        has_side_effect(op)
    try:  # effect tokens: functionalization and inductor keep and order the op
        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
    except ImportError:  # older torch: FX marking only
        return
    _register_effectful_op(op, _EffectType.ORDERED)


def define(name: str, schema: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op("topo::<name>")`` with an explicit schema."""
    return torch.library.custom_op(f"topo::{name}", mutates_args=(), schema=schema)


#: name → (implementation, setup_context, backward) of every op, for the eager autograd path.
_RULES: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {}


def register_autograd(op: Any, backward: Callable[..., Any], setup: Callable[..., Any]) -> None:
    """Register ``backward`` as ``op``'s autograd rule, for the custom op (torch.compile) and
    for :func:`call`'s eager path alike: one rule per collective."""
    op.register_autograd(backward, setup_context=setup)
    _RULES[op._name] = (op._init_fn, setup, backward)


class _Eager(torch.autograd.Function):
    """An op's implementation and autograd rule without the custom-op dispatcher, whose Python
    layers cost about 70 µs a call in eager mode (an autograd.Function costs a few)."""

    @staticmethod
    def forward(ctx: Any, name: str, x: torch.Tensor, *args: Any) -> torch.Tensor:
        impl, setup, backward = _RULES[name]
        y: torch.Tensor = impl(x, *args)
        setup(ctx, (x, *args), y)
        ctx.topo_backward = backward
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return (None, *ctx.topo_backward(ctx, g))


def call(name: str, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``torch.ops.topo.<name>(x, *args)`` while torch.compile traces; in eager mode the same
    implementation and backward through a light autograd.Function."""
    if _is_compiling():
        traced: torch.Tensor = getattr(torch.ops.topo, name)(x, *args)
        return traced
    result: torch.Tensor = _Eager.apply(name, x, *args)  # type: ignore[no-untyped-call]
    return result

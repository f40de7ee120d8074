"""Which activation a collective runs in: the per-thread stack of active contexts, the lookup
of an axis in it, and the group keys that find an activation again from another thread.

Active contexts live in a ``contextvars.ContextVar``: activations nest (the innermost context
that has an axis wins) and each thread has its own stack.

A collective that runs later or elsewhere — the backward of a gradient, which torch's autograd
engine runs on its own thread for CUDA tensors; a compiled graph; a thread the user started —
carries a *group key* naming its axis and the activation it was called in
(:func:`group_key`), and :func:`context_for_key` finds that activation again from any thread
through a process-wide registry of contexts (weak references: the registry keeps nothing
alive).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import weakref
from typing import TYPE_CHECKING

from topo.errors import NoActiveMeshError, TopoTypeError, TopoValueError
from topo.mesh import Axis

if TYPE_CHECKING:
    from topo.context import MeshContext

__all__ = ["active_contexts", "current"]

_ACTIVE: contextvars.ContextVar[tuple[MeshContext, ...]] = contextvars.ContextVar(
    "topo_active_meshes", default=()
)

#: Every context of this process by its id, open or closed, until it is garbage-collected:
#: how a collective carried to another thread finds the activation it was called in.
_CONTEXTS: weakref.WeakValueDictionary[int, MeshContext] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)


def register(ctx: MeshContext) -> int:
    """Enter ``ctx`` in the process-wide registry; its number (1, 2, ...), which group keys carry.

    Example::

        ctx.id = register(ctx)
    """
    number = next(_NEXT_ID)
    _CONTEXTS[number] = ctx
    return number


def active_contexts() -> tuple[MeshContext, ...]:
    """The active contexts of this thread, outermost first.

    Example::

        with mesh.activate():
            assert len(topo.active_contexts()) == 1
    """
    return _ACTIVE.get()


def current() -> MeshContext:
    """The innermost active context of this thread.

    Example::

        with mesh.activate():
            ctx = topo.current()
    """
    stack = _ACTIVE.get()
    if not stack:
        raise NoActiveMeshError(
            "topo.current requires an active mesh, but none is active in this thread; use "
            "`with mesh.activate():` (or run the code under topo.spawn)"
        )
    return stack[-1]


def find_context(axis: Axis, operation: str) -> tuple[MeshContext, tuple[str, ...], int]:
    """The innermost context whose mesh has ``axis``, with the axis names and group size.

    Example::

        ctx, names, n = find_context("tp", "all_reduce")   # names == ("tp",)
    """
    stack = _ACTIVE.get()
    for ctx in reversed(stack):
        try:
            names, size = ctx._axes[axis]
            return ctx, names, size
        except (KeyError, TypeError):
            if ctx.has_axis(axis):
                names, size = ctx.resolve(axis)
                return ctx, names, size
    if not stack:
        raise NoActiveMeshError(
            f"topo.{operation} requires an active mesh, but none is active in this thread; use "
            f"`with mesh.activate():` around the call (or run it under topo.spawn)"
        )
    if not isinstance(axis, (str, tuple, list)):
        raise TopoTypeError(
            f"topo.{operation} axis requires an axis name or a tuple of names, but got "
            f"{type(axis).__name__} {axis!r}"
        )
    if len(stack) == 1:
        stack[0].mesh.normalize_axis(axis)  # raises the mesh's own error naming valid axes
    valid = sorted({name for ctx in stack for name in ctx.mesh.axis_names})
    raise TopoValueError(
        f"topo.{operation} got axis {axis!r}, which no active mesh has; valid axes are "
        f"{', '.join(repr(v) for v in valid)} (active: {', '.join(repr(c.mesh) for c in stack)})"
    )


def group_key(ctx: MeshContext, names: tuple[str, ...]) -> str:
    """The key a collective carries for its group: the axis names (mesh order) and the id of
    the activation it was called in, e.g. ``"dp,tp@3"``; :func:`context_for_key` resolves it.

    Example::

        key = group_key(ctx, ("tp",))   # 'tp@1'
    """
    return f"{','.join(names)}@{ctx.id}"


@functools.lru_cache(maxsize=1024)
def _parse_key(key: str) -> tuple[tuple[str, ...], int | None]:
    names, at, number = key.rpartition("@")
    if not at or not number.isdigit():  # a bare axis key: the calling thread's activation
        return tuple(key.split(",")), None
    return tuple(names.split(",")), int(number)


def context_for_key(key: str, operation: str) -> tuple[MeshContext, tuple[str, ...], int]:
    """The activation a collective's group key (:func:`group_key`) belongs to, with the axis
    names and group size, found from any thread:

    1. the calling thread's active context with the key's id;
    2. else the calling thread's innermost active context with the axis (a compiled graph
       replayed in a later activation, or by another rank's thread under ``topo.simulate``);
    3. else the key's activation while it is open (autograd's device threads, a thread the user
       started);
    4. else, if that activation has closed, the one open activation of this process with the
       axis (of the same mesh and rank, while the closed one is still in memory), if there is
       exactly one: a compiled graph replayed after re-activating;
    5. else :class:`topo.NoActiveMeshError` naming the closed activation.

    Example::

        ctx, names, n = context_for_key("tp@1", "all_reduce")
    """
    names, number = _parse_key(key)
    axis: Axis = names[0] if len(names) == 1 else names
    stack = _ACTIVE.get()
    if number is not None:
        for ctx in stack:
            if ctx.id == number:
                return (ctx, *ctx.resolve(axis))
    if number is None or any(ctx.has_axis(axis) for ctx in stack):
        return find_context(axis, operation)
    origin = _CONTEXTS.get(number)
    if origin is not None and not origin._closed:
        return (origin, *origin.resolve(axis))
    twins = [
        c for c in list(_CONTEXTS.values())
        if not c._closed and c.has_axis(axis)
        and (origin is None or (c.mesh == origin.mesh and c.rank == origin.rank))
    ]  # fmt: skip
    if len(twins) == 1:
        return (twins[0], *twins[0].resolve(axis))
    called_in = repr(origin) if origin is not None else f"activation #{number}"
    raise NoActiveMeshError(
        f"topo.{operation} on axis {axis!r} requires the activation it was called (or traced) in "
        f"to be open, or an active mesh with that axis in this thread, but {called_in} is "
        f"closed and this thread has none; run backward (or the compiled function) inside the "
        f"`with mesh.activate():` block"
    )

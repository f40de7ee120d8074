"""Shared argument checks and layout helpers for the collectives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from topo._checks import as_int
from topo.active import _ACTIVE, find_context
from topo.communicators.base import REDUCE_OPS, ReduceOp, plain
from topo.communicators.dtypes import dtype_names
from topo.communicators.registry import (
    DEFAULT_BACKENDS,
    Backend,
    get_backend,
    registered_backends,
)
from topo.errors import TopoTypeError, TopoValueError
from topo.mesh import Axis
from topo.ops._library import _is_compiling, needs_op

if TYPE_CHECKING:
    from topo.communicators.base import Communicator
    from topo.context import MeshContext

_STRIDED = torch.strided
_TENSOR = torch.Tensor
_grad_enabled = torch.is_grad_enabled


def _version_bumper() -> Callable[[tuple[torch.Tensor, ...]], None]:
    """torch's own version-counter bump, one call for a tuple of tensors (the binding takes an
    iterable since torch 2.5; torch 2.4's took one tensor: then each in turn)."""
    bump: Any = torch._C._increment_version
    try:
        bump((torch.empty(0),))
    except (TypeError, RuntimeError):  # torch 2.4: one tensor, and none without a counter

        def bump_each(tensors: tuple[torch.Tensor, ...]) -> None:
            for tensor in tensors:
                if not tensor.is_inference():
                    bump(tensor)

        return bump_each
    return bump  # type: ignore[no-any-return]


#: ``bump_versions((out,))`` after a communicator wrote into ``out``'s memory, which no torch
#: op did: its version counter moves as an in-place op's (and a torch ``out=``) would, so a
#: graph that saved ``out`` before refuses its changed data at backward instead of computing
#: a wrong gradient. About 0.1 µs. (A tensor made under ``torch.inference_mode`` has no
#: counter and is left alone.)
#:
#: Example::
#:
#:     comm.all_reduce_into(x, "sum", out)
#:     bump_versions((out,))
bump_versions: Callable[[tuple[torch.Tensor, ...]], None] = _version_bumper()

#: ``locate``'s ``op`` when the collective reduces nothing.
NO_REDUCTION: object = object()


def locate(
    x: torch.Tensor, axis: Axis, operation: str, op: object = NO_REDUCTION
) -> tuple[MeshContext, tuple[str, ...], int, str]:
    """Where a plain collective on ``x`` runs: the innermost active context with ``axis``, the
    axis names (mesh order), the group size and ``x``'s device type — with ``x`` checked (a
    dense tensor on a device with a backend) and, for a reduction, ``op`` checked against the
    dtypes that context's backend reduces.

    One call on the hot path: a plain tensor on CPU or CUDA, an axis the innermost activation
    has resolved before, and a (device, dtype, op) that context has accepted before take the
    fast branch; everything else goes through :func:`topo.active.find_context`,
    :func:`device_type` and :func:`check_reduce`, which raise the errors.

    Example::

        ctx, names, n, device = locate(x, "tp", "all_reduce", "sum")
    """
    try:
        ctx = _ACTIVE.get()[-1]
        names, n = ctx._axes[axis]
    except (IndexError, KeyError, TypeError):
        ctx, names, n = find_context(axis, operation)
    if (
        type(x) is torch.Tensor and x.layout is _STRIDED and not x.is_nested
        and not x.is_quantized
    ):  # fmt: skip
        device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else device_type(x, operation)
    else:
        device = device_type(x, operation)
    if op is not NO_REDUCTION:
        try:
            known = (device, x.dtype, op) in ctx._reducible
        except TypeError:  # an unhashable op: check_reduce names it
            known = False
        if not known:
            check_reduce(x, op, operation, ctx.backend(device))
            ctx._reducible.add((device, x.dtype, op))
    return ctx, names, n, device


def route(
    x: torch.Tensor, axis: Axis, operation: str, op: object = NO_REDUCTION
) -> tuple[Communicator | None, int] | None:
    """The communicator a plain collective on ``x`` along ``axis`` runs on and the group size
    ``n`` (the communicator is ``None`` for a group of one), or ``None`` when ``x`` must take
    the collective's custom op instead (:func:`topo.ops._library.needs_op`: it requires grad
    with grad mode on, torch.compile is tracing, or ``x`` has a lazy conjugate or negative
    bit, which the op path resolves). ``x``, ``axis`` and ``op`` are checked as :func:`locate`
    checks them.

    The plain collectives' first step, and their hot path: after the first call with an axis
    and device type (and for a reduction, dtype and op) in the innermost activation, the
    answer is one dict lookup in that activation's ``_routes`` (emptied when it closes), after
    the checks on ``x`` every call needs. An axis only an outer activation has, and an
    unhashable axis (a list), are located on every call.

    Example::

        found = route(x, "tp", "all_reduce", "sum")
        if found is None:
            ...  # the custom op's path
        comm, n = found
    """
    if type(x) is _TENSOR and x.layout is _STRIDED and not x.is_nested:
        # _is_compiling() before the bits: dynamo cannot trace is_conj() (a bool, not a tensor)
        if (x.requires_grad and _grad_enabled()) or _is_compiling() or x.is_conj() or x.is_neg():
            return None
        device = "cpu" if x.is_cpu else "cuda" if x.is_cuda else None
        try:
            routes = _ACTIVE.get()[-1]._routes
            if op is not NO_REDUCTION:
                # a (dtype, op) accepted before: a quantized dtype never is (locate raises)
                return routes[axis, device, x.dtype, op]
            if not x.is_quantized:
                return routes[axis, device]
        except (IndexError, KeyError, TypeError):  # no activation; not seen yet; unhashable
            pass
    elif needs_op(x):
        return None
    return _first_route(x, axis, operation, op)


def _first_route(
    x: torch.Tensor, axis: Axis, operation: str, op: object
) -> tuple[Communicator | None, int]:
    """:func:`route` the long way: :func:`locate` (which raises the errors), then the
    communicator, remembered where the innermost activation itself has ``axis``."""
    ctx, names, n, device = locate(x, axis, operation, op)
    found = (ctx.communicator(names, device) if n > 1 else None, n)
    key = (axis, device) if op is NO_REDUCTION else (axis, device, x.dtype, op)
    remember(ctx, ctx._routes, key, found)
    return found


def remember(ctx: MeshContext, routes: dict[Any, Any], key: tuple[Any, ...], found: Any) -> None:
    """Put ``found`` in ``routes`` (one of ``ctx``'s route tables) where that is safe: ``ctx``
    is the innermost active activation (an outer activation's axis was found through the
    stack below, which can differ where the same activation is entered again) and ``key`` is
    hashable (an axis given as a list is not).

    Example::

        remember(ctx, ctx._pair_routes, ("pp", "cpu", 1), comm)
    """
    if _ACTIVE.get()[-1] is ctx:
        with contextlib.suppress(TypeError):
            routes[key] = found


def _default_backend(device: str) -> Backend | None:
    """The backend a device type gets by default (the registry's table decides)."""
    name = DEFAULT_BACKENDS.get(device)
    if name is not None:
        return get_backend(name)
    return next((b for b in registered_backends().values() if b.device_type == device), None)


def device_type(x: object, operation: str, name: str = "x") -> str:
    """The device type of ``x`` (``"cpu"`` or ``"cuda"``); a TypeError/ValueError if ``x`` is
    no tensor or lives on a device without a backend."""
    if not isinstance(x, torch.Tensor):
        raise TopoTypeError(
            f"topo.{operation} {name} requires a torch.Tensor, but got {type(x).__name__}"
        )
    if x.layout is not torch.strided or x.is_nested or x.is_quantized:
        _refuse_layout(x, operation, name)
    if x.is_cpu:  # the two fast properties first: this runs on every collective call
        return "cpu"
    if x.is_cuda:
        return "cuda"
    device: str = x.device.type
    if _default_backend(device) is None:
        served = sorted({b.device_type for b in registered_backends().values()})
        valid = " or ".join(f"{d!r} ({_default_backend(d).display_name})" for d in served)  # type: ignore[union-attr]
        raise TopoValueError(
            f"topo.{operation} {name} requires a tensor on a {valid} device (those with a "
            f"registered backend), but got {x.device}; move it with .cpu() or .cuda()"
        )
    return device


def _refuse_layout(x: torch.Tensor, operation: str, name: str) -> None:
    kind = (
        "a nested tensor" if x.is_nested
        else "a quantized tensor" if x.is_quantized
        else f"a {x.layout} tensor"
    )  # fmt: skip
    fix = (
        "x.dequantize()" if x.is_quantized
        else "x.to_padded_tensor(0)" if x.is_nested
        else "x.to_dense()"
    )  # fmt: skip
    raise TopoTypeError(
        f"topo.{operation} {name} requires a dense (strided) tensor, but got {kind}; convert "
        f"it with {fix} (or send its parts as dense tensors)"
    )


def check_tensor(x: object, operation: str, name: str = "x") -> torch.Tensor:
    """``x`` if it is a tensor on a supported device; else a TypeError/ValueError."""
    device_type(x, operation, name)
    return x  # type: ignore[return-value]


def check_reduce(
    x: torch.Tensor, op: object, operation: str, device: str | Backend | None = None
) -> ReduceOp:
    """Validate ``op`` and that ``x``'s dtype can be reduced by ``device`` (the backend that
    will run it, or a device type: then its default backend)."""
    if op not in REDUCE_OPS:
        raise TopoValueError(
            f"topo.{operation} op requires one of {', '.join(map(repr, REDUCE_OPS))}, but got "
            f"{op!r}"
        )
    backend = device if isinstance(device, Backend) else _default_backend(device or x.device.type)
    if backend is not None and x.dtype not in backend.reduce_dtypes:
        valid = dtype_names(backend.reduce_dtypes)
        raise TopoTypeError(
            f"topo.{operation} x requires a dtype {backend.display_name} can reduce ({valid}), "
            f"but got {x.dtype}; cast it first (e.g. x.float())"
        )
    if op == "avg" and not x.dtype.is_floating_point:
        raise TopoTypeError(
            f"topo.{operation} op='avg' requires a floating-point tensor, but got {x.dtype}; "
            f"use op='sum' and divide, or cast to float"
        )
    return op  # type: ignore[return-value]


def check_dim(x: torch.Tensor, dim: object, operation: str, name: str = "dim") -> int:
    """``dim`` normalized to ``0 <= dim < x.dim()``."""
    ndim = x.dim()
    if type(dim) is int and -ndim <= dim < ndim:
        return dim % ndim  # the common case, first: no message is built
    d = as_int(dim, f"topo.{operation} {name}")
    if ndim == 0:
        raise TopoValueError(
            f"topo.{operation} x requires at least one dimension for {name}, but got a 0-d "
            f"tensor; use x.reshape(1)"
        )
    if not -ndim <= d < ndim:
        raise TopoValueError(
            f"topo.{operation} {name} requires {-ndim} <= {name} < {ndim} for a {ndim}-d tensor, "
            f"but got {d}"
        )
    return d % ndim


def check_index(value: object, size: int, operation: str, name: str, axis: object) -> int:
    """An index within the axis group (``src``/``dst``), ``0 <= value < size``."""
    if type(value) is int and 0 <= value < size:
        return value  # the common case, first: no message is built
    i = as_int(value, f"topo.{operation} {name}", kind=f"an int index within axis {axis!r}")
    if not 0 <= i < size:
        raise TopoValueError(
            f"topo.{operation} {name} requires 0 <= {name} < {size} (an index within axis "
            f"{axis!r} of size {size}, not a global rank), but got {i}"
        )
    return i


def check_peer(
    peer: object, n: int, me: int, operation: str, name: str, axis: object
) -> int:
    """A point-to-point peer (``dst``/``src``): an index within the axis group, and another
    than this rank's own index ``me``.

    Example::

        dst = check_peer(1, 2, 0, "send", "dst", "pp")   # 1
    """
    index = check_index(peer, n, operation, name, axis)
    if index == me:
        raise TopoValueError(
            f"topo.{operation} {name} requires another index than this rank's own ({me}) along "
            f"axis {axis!r}, but got {index}"
        )
    return index


def stack_chunks(x: torch.Tensor, dim: int, n: int, operation: str, axis: object) -> torch.Tensor:
    """Split ``x`` into ``n`` equal chunks along ``dim``, stacked on a new contiguous dim 0
    (:func:`plain`: what a communicator takes)."""
    length = x.shape[dim]
    if length % n:
        raise TopoValueError(
            f"topo.{operation} requires x.shape[{dim}] divisible by the size {n} of axis "
            f"{axis!r}, but got x.shape[{dim}] = {length}; pad or choose another dim"
        )
    shape = (*x.shape[:dim], n, length // n, *x.shape[dim + 1 :])
    return plain(x.reshape(shape).movedim(dim, 0))


#: The dtypes ``torch.cat`` has kernels for on every device (it has none for some newer ones,
#: e.g. ``float4_e2m1fn_x2`` on CPU, which a copy of a permuted view moves bit-exact).
CAT_DTYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
})  # fmt: skip


def concat_chunks(
    stacked: torch.Tensor, dim: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate the chunks of a stacked ``(n, *s)`` tensor along ``dim`` of ``s`` (into
    ``out`` when given: the result's shape, any strides)."""
    if stacked.dtype in CAT_DTYPES and (dim or out is not None):  # one copy: faster than movedim
        chunks = stacked.unbind()  # dim 0, the default: 0.14 µs less than unbind(0)
        return torch.cat(chunks, dim) if out is None else torch.cat(chunks, dim, out=out)
    n, *shape = stacked.shape
    if out is not None:  # a copy of the permuted chunks into out's own layout
        out.view(*shape[:dim], n, *shape[dim:]).copy_(stacked.movedim(0, dim))
        return out
    shape[dim] *= n
    return stacked.reshape(shape) if dim == 0 else stacked.movedim(0, dim).reshape(shape)


def into_same_shape(
    comm: Communicator | None,
    x: torch.Tensor,
    out: object,
    operation: str,
    arg: object,
) -> torch.Tensor:
    """``operation(x, arg)`` over ``comm`` (``None``: a group of one) — ``"all_reduce"`` with
    its op or ``"broadcast"`` with its root: a result of ``x``'s shape — written into the
    caller's ``out``, checked: through the communicator's ``<operation>_into`` when both are
    contiguous and ``out`` has no lazy ``conj()``/negative bit (:func:`direct_out`; ``out``
    may be ``x``: in place, no allocation), else through a copy.

    Example::

        return into_same_shape(comm, x, out, "broadcast", root)
    """
    # in place (out is x): x's own shape, dtype and device, and no lazy bit (route sent such
    # an x down the op path); only a gradient is refused
    in_place = out is x and not x.requires_grad
    direct = in_place or direct_out(out, x, x.shape, operation)
    target: torch.Tensor = out  # type: ignore[assignment]  # a tensor: checked above
    if comm is None:
        return target if target is x else target.copy_(x)
    if direct and x.is_contiguous():
        into = getattr(comm, _INTO[operation], None)
        if into is not None:
            into(x, arg, target)
            bump_versions((target,))  # written behind autograd's back
            return target
    return target.copy_(getattr(comm, operation)(x.contiguous(), arg))


#: The communicator method that writes ``operation``'s result into a given tensor.
_INTO = {"all_reduce": "all_reduce_into", "broadcast": "broadcast_into"}


def result_into(
    y: torch.Tensor, out: torch.Tensor | None, x: torch.Tensor, operation: str
) -> torch.Tensor:
    """An op path's result ``y``, or ``y`` copied into the caller's ``out`` (checked against
    ``x``: it refuses autograd, as torch's ``out=`` arguments do).

    Example::

        return result_into(call("all_reduce", x, key, n, op), out, x, "all_reduce")
    """
    if out is None:
        return y
    check_out(out, x, y.shape, operation)
    return out.copy_(y)


def check_out(
    out: object, x: torch.Tensor, shape: tuple[int, ...] | torch.Size, operation: str
) -> torch.Tensor:
    """``out`` if it can hold the result (``shape``, ``x``'s dtype and device) and need not be
    differentiated; else a TypeError/ValueError naming what was required and got."""
    if not isinstance(out, torch.Tensor):
        raise TopoTypeError(
            f"topo.{operation} out requires a torch.Tensor (or None), but got "
            f"{type(out).__name__}"
        )
    if out.dtype is not x.dtype or out.device != x.device:  # a dtype is a singleton
        raise TopoTypeError(
            f"topo.{operation} out requires x's dtype and device ({x.dtype}, {x.device}), but "
            f"got {out.dtype} on {out.device}; allocate it with x.new_empty(shape)"
        )
    if out.shape != shape and tuple(out.shape) != tuple(shape):  # a torch.Size is a tuple
        raise TopoValueError(
            f"topo.{operation} out requires the result's shape {tuple(shape)}, but got "
            f"{tuple(out.shape)}"
        )
    if (out.requires_grad or x.requires_grad) and torch.is_grad_enabled():
        raise TopoValueError(
            f"topo.{operation} out requires tensors that need no gradient (like torch's out= "
            f"arguments, it does not support autograd), but "
            f"{'out' if out.requires_grad else 'x'} requires grad; drop out= (use the returned "
            f"tensor) or run under torch.no_grad()"
        )
    return out


def direct_out(
    out: object, x: torch.Tensor, shape: tuple[int, ...] | torch.Size, operation: str
) -> bool:
    """:func:`check_out`, then whether a communicator may write the result into ``out``'s
    memory directly: ``out`` is contiguous and has no lazy ``conj()``/negative bit (such a
    view's memory does not hold its values; ``out.copy_(result)`` resolves it).

    Example::

        if direct_out(out, x, (rows,), "reduce_scatter"):
            comm.reduce_scatter_into(x, op, out)
            bump_versions((out,))  # a direct write: autograd must see it
            return out
    """
    target = check_out(out, x, shape, operation)
    return target.is_contiguous() and not (target.is_conj() or target.is_neg())

"""Point-to-point: send, recv, ppermute and shift (pipeline neighbours)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from topo._checks import as_bool, as_int
from topo.active import _ACTIVE, find_context
from topo.collectives._common import (
    bump_versions,
    check_index,
    check_peer,
    check_tensor,
    device_type,
    remember,
)
from topo.communicators.base import Communicator, plain
from topo.context import MeshContext
from topo.errors import BackendUnavailableError, TopoTypeError, TopoValueError
from topo.mesh import Axis
from topo.ops._library import call, group_of, needs_op

__all__ = ["ppermute", "recv", "send", "shift"]


def _pair(
    ctx: MeshContext,
    names: tuple[str, ...],
    n: int,
    axis: Axis,
    peer: object,
    operation: str,
    name: str,
    device: str,
) -> Communicator:
    """The two-rank communicator between this rank and index ``peer`` of its group (checked:
    an index within the axis, and another than this rank's own)."""
    index = check_peer(peer, n, ctx.axis_index(names), operation, name, axis)
    return ctx.pair_communicator(names, index, device)


def _pair_route(
    axis: Axis, peer: object, operation: str, name: str, device: str
) -> Communicator:
    """:func:`_pair` for ``axis`` in the innermost activation that has it. send's and recv's
    hot path: remembered by (axis, device type, peer) in the innermost activation's
    ``_pair_routes`` (emptied when it closes) where that activation has ``axis`` itself, so
    after the first call it is one dict lookup.

    Example::

        comm = _pair_route("pp", 1, "send", "dst", "cpu")
    """
    if type(peer) is int:  # not a bool, which a dict would take for 0 or 1
        try:
            return _ACTIVE.get()[-1]._pair_routes[axis, device, peer]
        except (IndexError, KeyError, TypeError):  # no activation; not seen yet; unhashable
            pass
    ctx, names, n = find_context(axis, operation)
    comm = _pair(ctx, names, n, axis, peer, operation, name, device)
    if type(peer) is int:
        remember(ctx, ctx._pair_routes, (axis, device, peer), comm)
    return comm


def send(x: torch.Tensor, axis: Axis, dst: int) -> None:
    """Send ``x`` to index ``dst`` of ``axis``; that rank must call :func:`recv` with this
    rank's index as ``src`` and ``x``'s shape and dtype.

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 0:
                topo.send(activations, axis="pp", dst=1)
    """
    comm = _pair_route(axis, dst, "send", "dst", device_type(x, "send"))
    comm.exchange([(1 - comm.index, plain(x))], [])


def recv(
    shape: Sequence[int] | torch.Size,
    dtype: torch.dtype,
    axis: Axis,
    src: int,
    device: torch.device | str = "cpu",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Receive a tensor of ``shape`` and ``dtype`` from index ``src`` of ``axis``.

    With ``out`` (a tensor of that shape and dtype on ``device``) the tensor is received there
    and ``out`` is returned, as ``torch.distributed.recv`` receives into its tensor: a
    contiguous ``out`` takes the bytes directly, with no allocation.

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 1:
                acts = topo.recv((4, 1024), torch.bfloat16, axis="pp", src=0)
                topo.recv(acts.shape, acts.dtype, "pp", src=0, out=acts)  # 0's next send
    """
    try:
        template, kind = _TEMPLATES[dtype, device]
    except (KeyError, TypeError):
        template, kind = _template(dtype, device)
    dims = _dims(shape)
    direct = out is not None and _check_recv_out(out, dims, template)
    comm = _pair_route(axis, src, "recv", "src", kind)
    if out is not None and direct:  # the bytes land in out itself
        comm.exchange([], [(1 - comm.index, out)])
        bump_versions((out,))  # written in place, as by an in-place op: autograd sees it
        return out
    pool = getattr(comm, "buffers", None)  # large CPU buffers: reused pages (gloo)
    buffer: torch.Tensor
    if pool is not None and kind == "cpu":
        buffer = pool.empty(dims, dtype)
    else:  # sizes as separate ints: torch parses them faster than a tuple
        buffer = template.new_empty(*dims) if dims else template.new_empty(())
    comm.exchange([], [(1 - comm.index, buffer)])
    return buffer if out is None else out.copy_(buffer)  # any other out: through a copy


#: The tensor types recv lets a backend write into directly (a subclass such as DTensor is
#: filled through its own ``copy_``).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _check_recv_out(out: object, dims: Sequence[int], template: torch.Tensor) -> bool:
    """Check recv's ``out``: a tensor of the received shape, ``dtype`` and device that needs
    no gradient, may be written here and has no two elements in one place; else a
    TypeError/ValueError naming what was required and got. Returns whether the received
    bytes may land in ``out`` directly: a plain contiguous tensor without a conjugate or
    negative bit, outside inference mode. Any other (strided, a lazy ``conj()`` view, a
    subclass) is filled through ``copy_``, which knows how."""
    if not isinstance(out, torch.Tensor):
        raise TopoTypeError(
            f"topo.recv out requires a torch.Tensor (or None), but got {type(out).__name__}"
        )
    if out.dtype != template.dtype or out.device != template.device:
        raise TopoTypeError(
            f"topo.recv out requires the dtype and device it receives ({template.dtype}, "
            f"{template.device}), but got {out.dtype} on {out.device}; call "
            f"topo.recv(out.shape, out.dtype, axis, src, device=out.device, out=out)"
        )
    if out.shape != dims and tuple(out.shape) != tuple(dims):  # dims: a tuple or a Size
        raise TopoValueError(
            f"topo.recv out requires the shape it receives {tuple(dims)}, but got "
            f"{tuple(out.shape)}"
        )
    if out.requires_grad and torch.is_grad_enabled():
        raise TopoValueError(
            "topo.recv out requires a tensor that needs no gradient (recv writes into it, as "
            "torch's out= arguments do), but out requires grad; drop out= (use the returned "
            "tensor) or run under torch.no_grad()"
        )
    contiguous = out.is_contiguous()  # (a contiguous tensor has no overlapping elements)
    if not contiguous and torch._debug_has_internal_overlap(out) == 1:  # MemOverlap::Yes
        raise TopoValueError(
            f"topo.recv out requires a tensor whose elements have memory of their own, but "
            f"out's elements share memory (strides {out.stride()}: an expanded view?); "
            f"allocate it with torch.empty({tuple(dims)}, ...)"
        )
    if out.is_inference():  # no version counter: through copy_, which torch checks
        if not torch.is_inference_mode_enabled():
            raise TopoValueError(
                "topo.recv out requires a tensor it may write here, but out was made under "
                "torch.inference_mode() and this call is outside it (torch forbids that "
                "in-place write); receive inside inference_mode, or into a tensor made "
                "outside it"
            )
        return False
    return contiguous and type(out) in _PLAIN_TYPES and not (out.is_conj() or out.is_neg())


#: recv's allocation per (dtype, device argument): an empty tensor of that dtype on that
#: device, whose ``new_empty`` is the fastest allocation torch has, and its device type.
_TEMPLATES: dict[tuple[object, object], tuple[torch.Tensor, str]] = {}


def _template(dtype: object, device: object) -> tuple[torch.Tensor, str]:
    """recv's checked ``dtype`` and ``device`` as an empty tensor and its device type,
    remembered in ``_TEMPLATES`` for a ``device`` given as a string or a torch.device (an int
    is not remembered: ``0 == False``), except ``"cuda"`` without an index, which follows the
    current device."""
    if not isinstance(dtype, torch.dtype):
        raise TopoTypeError(
            f"topo.recv dtype requires a torch.dtype like torch.float32, but got "
            f"{type(dtype).__name__} {dtype!r}"
        )
    if isinstance(device, torch.device):
        place = device
    else:
        try:
            place = torch.device(device)  # type: ignore[call-overload]
        except (RuntimeError, TypeError):
            raise TopoValueError(
                f"topo.recv device requires a device like 'cpu' or 'cuda:0', but got "
                f"{device!r}"
            ) from None
    kind = place.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"topo.recv device {device!r} requires a CUDA GPU, but torch sees none "
            f"(torch.cuda.is_available() is False); receive on 'cpu' (gloo) instead"
        )
    template = torch.empty(0, dtype=dtype, device=place)
    if kind not in ("cpu", "cuda"):
        device_type(template, "recv", "device")  # raises
    if (kind == "cpu" or place.index is not None) and type(device) in (str, torch.device):
        _TEMPLATES[dtype, device] = (template, kind)
    return template, kind


def _dims(shape: object) -> Sequence[int]:
    """recv's ``shape`` as a sequence of non-negative ints (a tuple or torch.Size of plain
    ints as it is: the common case, checked without building a new tuple)."""
    if type(shape) is tuple or type(shape) is torch.Size:
        for d in shape:
            if type(d) is not int or d < 0:
                break
        else:
            return shape  # type: ignore[return-value]
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TopoTypeError(
            f"topo.recv shape requires a sequence of ints like (4, 1024), but got "
            f"{type(shape).__name__} {shape!r}"
        )
    return tuple(as_int(d, "topo.recv shape", minimum=0) for d in shape)


def _check_perm(perm: object, n: int, axis: Axis) -> list[tuple[int, int]]:
    if not isinstance(perm, (list, tuple)):
        raise TopoTypeError(
            f"topo.ppermute perm requires a sequence of (src, dst) index pairs, but got "
            f"{type(perm).__name__}"
        )
    pairs: list[tuple[int, int]] = []
    sources: set[int] = set()
    targets: set[int] = set()
    for pair in perm:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TopoTypeError(
                f"topo.ppermute perm requires (src, dst) pairs, but got the element {pair!r}"
            )
        s = check_index(pair[0], n, "ppermute", "perm src", axis)
        d = check_index(pair[1], n, "ppermute", "perm dst", axis)
        if s in sources or d in targets:
            raise TopoValueError(
                f"topo.ppermute perm requires each index at most once as a source and once as a "
                f"destination, but got {s if s in sources else d} twice in {list(perm)}"
            )
        sources.add(s)
        targets.add(d)
        pairs.append((s, d))
    return pairs


def ppermute(x: torch.Tensor, axis: Axis, perm: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Send ``x`` along the ``(src, dst)`` index pairs of ``perm`` (JAX semantics).

    Index ``dst`` gets ``src``'s ``x``; an index that is no pair's destination gets zeros.
    Differentiable: the backward is the ppermute of the cotangent by the inverse pairs.

    Example::

        with DeviceMesh(pp=4).activate():
            # a ring: index i gets index i-1's x
            y = topo.ppermute(x, axis="pp", perm=[(i, (i + 1) % 4) for i in range(4)])
    """
    if needs_op(x):
        key, n, _ = group_of(axis, "ppermute")
        check_tensor(x, "ppermute")
        return _ppermute_op(x, key, n, _check_perm(perm, n, axis))
    ctx, names, n = find_context(axis, "ppermute")
    check_tensor(x, "ppermute")
    pairs = _check_perm(perm, n, axis)
    me = ctx.axis_index(names)
    dst = next((d for s, d in pairs if s == me), None)
    src = next((s for s, d in pairs if d == me), None)
    return _move(ctx, names, n, x, dst, src)


def shift(x: torch.Tensor, axis: Axis, offset: int = 1, wrap: bool = True) -> torch.Tensor:
    """Send ``x`` ``offset`` steps along ``axis`` and receive from ``offset`` steps back.

    The pipeline pattern: with ``offset=1`` index ``i`` sends to ``i+1`` and receives from
    ``i-1``. With ``wrap=False`` the first ``offset`` indices receive zeros and the last
    ``offset`` send nothing. Differentiable: the backward shifts the cotangent by ``-offset``.

    Example::

        with DeviceMesh(pp=4).activate():
            inputs = topo.shift(outputs, axis="pp", offset=1, wrap=False)
    """
    if needs_op(x):
        key, n, _ = group_of(axis, "shift")
        check_tensor(x, "shift")
        offset = as_int(offset, "topo.shift offset")
        wrap = as_bool(wrap, "topo.shift wrap")
        targets = [(i, i + offset) for i in range(n)]
        pairs = [(i, j % n) for i, j in targets] if wrap else [p for p in targets if 0 <= p[1] < n]
        return _ppermute_op(x, key, n, pairs)
    ctx, names, n = find_context(axis, "shift")
    check_tensor(x, "shift")
    offset = as_int(offset, "topo.shift offset")
    wrap = as_bool(wrap, "topo.shift wrap")
    me = ctx.axis_index(names)
    dst: int | None = me + offset
    src: int | None = me - offset
    if wrap:
        dst, src = dst % n, src % n  # type: ignore[operator]
    else:
        dst = dst if 0 <= dst < n else None  # type: ignore[operator]
        src = src if 0 <= src < n else None  # type: ignore[operator]
    return _move(ctx, names, n, x, dst, src)


def _ppermute_op(x: torch.Tensor, key: str, n: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """ppermute through ``torch.ops.topo.ppermute``: autograd and torch.compile."""
    y: torch.Tensor = call("ppermute", x, key, n, [i for pair in pairs for i in pair])
    return y


def _move(
    ctx: MeshContext,
    names: tuple[str, ...],
    n: int,
    x: torch.Tensor,
    dst: int | None,
    src: int | None,
) -> torch.Tensor:
    """Send ``x`` to index ``dst`` and receive from index ``src`` (either may be None)."""
    me = ctx.axis_index(names)
    # Every rank of the group takes part, even one with nothing to move: the communicator is
    # created collectively on first use.
    comm = ctx.communicator(names, x.device.type) if n > 1 else None
    if dst == me and src == me:
        return x.clone(memory_format=torch.contiguous_format)
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    sends = [] if dst is None else [(dst, plain(x))]
    recvs = [] if src is None else [(src, out)]
    if comm is not None:
        comm.exchange(sends, recvs)
    return out

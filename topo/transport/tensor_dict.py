"""Tensor dicts: broadcast, send and receive nested dicts of tensors and scalars.

The structure, scalars, dtypes and shapes travel first as JSON (never pickle) over the CPU
communicator; then the tensors move on their own device's communicator (gloo for CPU, NCCL
for CUDA) in as few calls as possible: tensors under :data:`COALESCE_BYTES` are packed into
one buffer per device kind, larger ones move alone (no packing copy). Received small tensors
are views into that one buffer.

With ``all_gather_axis`` (the pipeline hand-off trick), each sender of that axis sends only its
1/n slice of every tensor whose element count divides by n, and the receivers all-gather the
slices along the same axis: n times fewer bytes between the two stages. A tensor whose element
count does not divide (or an empty one) falls back to moving whole from every sender.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from topo.active import find_context
from topo.collectives._common import check_index, check_peer
from topo.communicators.base import plain
from topo.context import MeshContext
from topo.errors import CollectiveMismatchError, TopoError, TopoValueError
from topo.mesh import Axis
from topo.transport import _wire
from topo.transport.metadata import TensorSpec, decode_tree, encode_tree, tree_specs

__all__ = ["broadcast_tensor_dict", "recv_tensor_dict", "send_tensor_dict"]

#: Tensors smaller than this many bytes are coalesced into one buffer per device kind.
COALESCE_BYTES = 1 << 20

_KINDS = ("cpu", "cuda")


@dataclass
class _Plan:
    """How the tensors of one device kind move (both sides compute it from the specs)."""

    packed: list[tuple[int, int]] = field(default_factory=list)  # (tensor index, offset)
    packed_bytes: int = 0
    single: list[int] = field(default_factory=list)
    split: list[tuple[int, int, int]] = field(default_factory=list)  # (index, offset, part)
    split_bytes: int = 0


def _nbytes(spec: TensorSpec) -> int:
    dtype, shape, _ = spec
    count = 1
    for s in shape:
        count *= s
    return count * torch.empty(0, dtype=dtype).element_size()


def _numel(spec: TensorSpec) -> int:
    count = 1
    for s in spec[1]:
        count *= s
    return count


def plan(specs: list[TensorSpec], n_split: int) -> dict[str, _Plan]:
    """Per device kind: which tensors are packed (and where), moved alone, or split in
    ``n_split`` slices (``n_split`` 1: none). Deterministic, so both sides agree.

    Example::

        plan([(torch.float32, (4,), "cpu")], 1)["cpu"].packed   # [(0, 0)]
    """
    plans = {kind: _Plan() for kind in _KINDS}
    for i, spec in enumerate(specs):
        p, size, numel = plans[spec[2]], _nbytes(spec), _numel(spec)
        if n_split > 1 and numel and numel % n_split == 0:
            part = size // n_split
            p.split.append((i, p.split_bytes, part))
            p.split_bytes = _wire.align(p.split_bytes + part)
        elif size < COALESCE_BYTES:
            p.packed.append((i, p.packed_bytes))
            p.packed_bytes = _wire.align(p.packed_bytes + size)
        else:
            p.single.append(i)
    return plans


def _device(ctx: MeshContext, kind: str) -> torch.device:
    return torch.device("cpu") if kind == "cpu" else ctx.device


def _send_tensors(
    tensors: list[torch.Tensor],
    plans: dict[str, _Plan],
    move: Callable[[str, torch.Tensor], None],
    slot: int,
) -> None:
    """Move the sender's tensors by the plan: ``move(kind, tensor)`` per message."""
    for kind, p in plans.items():
        if p.packed:
            device = tensors[p.packed[0][0]].device
            buffer = torch.empty(p.packed_bytes, dtype=torch.uint8, device=device)
            _wire.pack_into(buffer, [tensors[i] for i, _ in p.packed], [o for _, o in p.packed])
            move(kind, buffer)
        for i in p.single:
            move(kind, plain(tensors[i]))
        if p.split:
            device = tensors[p.split[0][0]].device
            buffer = torch.empty(p.split_bytes, dtype=torch.uint8, device=device)
            for i, at, part in p.split:
                raw = _wire.byte_view(plain(tensors[i]))
                buffer[at : at + part].copy_(raw[slot * part : (slot + 1) * part])
            move(kind, buffer)


def _recv_tensors(
    specs: list[TensorSpec],
    plans: dict[str, _Plan],
    take: Callable[[str, torch.Tensor], torch.Tensor],
    gather: Callable[[str, torch.Tensor], torch.Tensor] | None,
    device: Callable[[str], torch.device],
) -> list[torch.Tensor]:
    """Receive by the plan: ``take(kind, like)`` returns a received tensor shaped like
    ``like``; ``gather(kind, slices)`` all-gathers the split buffer (stacked)."""
    out: list[torch.Tensor | None] = [None] * len(specs)
    for kind, p in plans.items():
        if p.packed:
            buffer = take(kind, torch.empty(p.packed_bytes, dtype=torch.uint8, device=device(kind)))
            for i, at in p.packed:
                out[i] = _wire.unpack(buffer, at, specs[i][0], specs[i][1])
        for i in p.single:
            dtype, shape, _ = specs[i]
            out[i] = take(kind, torch.empty(shape, dtype=dtype, device=device(kind)))
        if p.split:
            assert gather is not None
            buffer = take(kind, torch.empty(p.split_bytes, dtype=torch.uint8, device=device(kind)))
            stacked = gather(kind, buffer)  # (n, split_bytes)
            for i, at, part in p.split:
                dtype, shape, _ = specs[i]
                whole = stacked[:, at : at + part].reshape(-1)
                out[i] = whole.view(dtype).reshape(shape)
    return out  # type: ignore[return-value]


def broadcast_tensor_dict(d: Mapping[str, Any] | None, axis: Axis, src: int = 0) -> dict[str, Any]:
    """Index ``src``'s dict of tensors and scalars on every rank of ``axis`` (others pass
    ``None``).

    Values may nest dicts, lists and tuples of tensors (CPU or CUDA) and JSON-able scalars
    (int, float, str, bool, None). The metadata travels as JSON, then small tensors move
    coalesced in one broadcast per device kind and large ones in one broadcast each. CUDA
    tensors arrive on the context's device. ``src`` gets its own ``d`` back (not a copy).

    Example::

        with DeviceMesh(tp=2).activate():
            d = {"x": torch.ones(2), "step": 3} if topo.axis_index("tp") == 0 else None
            d = topo.broadcast_tensor_dict(d, axis="tp")   # {'x': tensor([1., 1.]), 'step': 3}
    """
    ctx, names, n = find_context(axis, "broadcast_tensor_dict")
    root = check_index(src, n, "broadcast_tensor_dict", "src", axis)
    me = ctx.axis_index(names)
    if me == root:
        try:
            tree, tensors = encode_tree(d, "broadcast_tensor_dict")
        except TopoError as error:  # tell the receivers instead of leaving them waiting
            if n > 1:
                failed = _wire.dumps({"error": str(error)})
                _wire.broadcast_bytes(ctx.communicator(names, "cpu"), failed, root)
            raise
        if n == 1:
            return dict(d)  # type: ignore[arg-type]
        meta = _wire.dumps({"tree": tree})
        _wire.broadcast_bytes(ctx.communicator(names, "cpu"), meta, root)
        specs = [(t.dtype, tuple(t.shape), t.device.type) for t in tensors]

        def send(kind: str, x: torch.Tensor) -> None:
            ctx.communicator(names, kind).broadcast(x, root)

        _send_tensors(tensors, plan(specs, 1), send, 0)  # type: ignore[arg-type]
        return d  # type: ignore[return-value]
    message = _wire.loads(
        _wire.broadcast_bytes(ctx.communicator(names, "cpu"), None, root), "broadcast_tensor_dict"
    )
    tree = _tree(message, "broadcast_tensor_dict", root)
    specs, unknown = tree_specs(tree, "broadcast_tensor_dict")

    def take(kind: str, like: torch.Tensor) -> torch.Tensor:
        return ctx.communicator(names, kind).broadcast(like, root)

    tensors = _recv_tensors(specs, plan(specs, 1), take, None, lambda k: _device(ctx, k))
    if unknown is not None:
        raise unknown  # after taking the bytes: the axis stays in step
    result: dict[str, Any] = decode_tree(tree, tensors)
    return result


def _tree(message: Any, operation: str, source: int) -> Any:
    """The tree of a received message, or the sender's own error raised here too."""
    if not isinstance(message, dict) or ("tree" not in message and "error" not in message):
        raise CollectiveMismatchError(
            f"topo.{operation} received a message without a tensor-dict tree; the sending "
            f"rank must call the matching operation"
        )
    if "error" in message:
        raise TopoValueError(
            f"topo.{operation}: the sending rank (index {source}) could not send its tensor "
            f"dict: {message['error']}"
        )
    return message["tree"]


def _peer(ctx: MeshContext, names: tuple[str, ...], n: int, peer: object, what: str,
          operation: str, axis: Axis) -> int:  # fmt: skip
    return check_peer(peer, n, ctx.axis_index(names), operation, what, axis)


def _split_axis(
    all_gather_axis: Axis | None, operation: str
) -> tuple[MeshContext | None, tuple[str, ...], int, int]:
    if all_gather_axis is None:
        return None, (), 1, 0
    ctx, names, n = find_context(all_gather_axis, operation)
    return ctx, names, n, ctx.axis_index(names)


def send_tensor_dict(
    d: Mapping[str, Any], axis: Axis, dst: int, all_gather_axis: Axis | None = None
) -> None:
    """Send a dict of tensors and scalars to index ``dst`` of ``axis`` (which calls
    :func:`recv_tensor_dict` with this rank's index as ``src``).

    With ``all_gather_axis`` every rank of that axis sends (to its own peer) only its 1/n
    slice of each tensor whose element count divides by n; the receivers all-gather the
    slices along the same axis. Other tensors move whole.

    Example::

        with DeviceMesh(pp=2, tp=2).activate():
            if topo.axis_index("pp") == 0:
                topo.send_tensor_dict({"hidden": h, "step": 3}, axis="pp", dst=1,
                                      all_gather_axis="tp")
    """
    ctx, names, n = find_context(axis, "send_tensor_dict")
    peer = _peer(ctx, names, n, dst, "dst", "send_tensor_dict", axis)
    cpu = ctx.pair_communicator(names, peer, "cpu")
    try:
        _, _, n_split, slot = _split_axis(all_gather_axis, "send_tensor_dict")
        tree, tensors = encode_tree(d, "send_tensor_dict")
    except TopoError as error:  # tell the receiver instead of leaving it waiting
        _wire.send_bytes(cpu, _wire.dumps({"error": str(error)}), 1 - cpu.index)
        raise
    _wire.send_bytes(cpu, _wire.dumps({"tree": tree, "split": n_split}), 1 - cpu.index)
    specs = [(t.dtype, tuple(t.shape), t.device.type) for t in tensors]

    def send(kind: str, x: torch.Tensor) -> None:
        comm = ctx.pair_communicator(names, peer, kind)
        comm.exchange([(1 - comm.index, x)], [])

    _send_tensors(tensors, plan(specs, n_split), send, slot)  # type: ignore[arg-type]


def recv_tensor_dict(axis: Axis, src: int, all_gather_axis: Axis | None = None) -> dict[str, Any]:
    """Receive the dict that index ``src`` of ``axis`` sends with :func:`send_tensor_dict`
    (pass the same ``all_gather_axis`` as the sender). CUDA tensors arrive on the context's
    device; small tensors are views into one received buffer.

    Example::

        with DeviceMesh(pp=2, tp=2).activate():
            if topo.axis_index("pp") == 1:
                d = topo.recv_tensor_dict(axis="pp", src=0, all_gather_axis="tp")
    """
    ctx, names, n = find_context(axis, "recv_tensor_dict")
    peer = _peer(ctx, names, n, src, "src", "recv_tensor_dict", axis)
    ag_ctx, ag_names, n_split, _ = _split_axis(all_gather_axis, "recv_tensor_dict")
    cpu = ctx.pair_communicator(names, peer, "cpu")
    message = _wire.loads(_wire.recv_bytes(cpu, 1 - cpu.index), "recv_tensor_dict")
    tree = _tree(message, "recv_tensor_dict", peer)
    if message.get("split") != n_split:
        raise CollectiveMismatchError(
            f"topo.recv_tensor_dict all_gather_axis requires the sender's split ({message.get('split')} "
            f"slices) to match this rank's ({n_split} for all_gather_axis={all_gather_axis!r}); "
            f"pass the same all_gather_axis on both sides"
        )
    specs, unknown = tree_specs(tree, "recv_tensor_dict")

    def take(kind: str, like: torch.Tensor) -> torch.Tensor:
        comm = ctx.pair_communicator(names, peer, kind)
        comm.exchange([], [(1 - comm.index, like)])
        return like

    def gather(kind: str, part: torch.Tensor) -> torch.Tensor:
        assert ag_ctx is not None
        return ag_ctx.communicator(ag_names, kind).all_gather(part)

    tensors = _recv_tensors(
        specs, plan(specs, n_split), take, gather if n_split > 1 else None,
        lambda k: _device(ctx, k),
    )  # fmt: skip
    if unknown is not None:
        raise unknown  # after taking the bytes: the pair stays in step
    result: dict[str, Any] = decode_tree(tree, tensors)
    return result

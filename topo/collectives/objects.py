"""Picklable Python objects over an axis (through the CPU communicator)."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from topo.collectives._common import check_index
from topo.context import find_context
from topo.mesh import Axis

__all__ = ["all_gather_object", "broadcast_object"]


def _to_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def broadcast_object(obj: Any, axis: Axis, src: int = 0) -> Any:
    """Index ``src``'s picklable ``obj`` on every rank of ``axis`` (others pass anything).

    Example::

        with DeviceMesh(dp=2).activate():
            config = topo.broadcast_object(config if topo.axis_index("dp") == 0 else None,
                                           axis="dp")
    """
    ctx, names, n = find_context(axis, "broadcast_object")
    root = check_index(src, n, "broadcast_object", "src", axis)
    if n == 1:
        return pickle.loads(pickle.dumps(obj))
    comm = ctx.communicator(names, "cpu")
    payload = _to_tensor(obj) if comm.index == root else torch.empty(0, dtype=torch.uint8)
    length = comm.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), root)
    if comm.index != root:
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
    data = comm.broadcast(payload, root)
    return pickle.loads(data.numpy().tobytes())


def all_gather_object(obj: Any, axis: Axis) -> list[Any]:
    """Every rank's picklable ``obj``, in axis-index order, on every rank of ``axis``.

    Example::

        with DeviceMesh(dp=2).activate():
            hosts = topo.all_gather_object(socket.gethostname(), axis="dp")
    """
    ctx, names, n = find_context(axis, "all_gather_object")
    if n == 1:
        return [pickle.loads(pickle.dumps(obj))]
    comm = ctx.communicator(names, "cpu")
    payload = _to_tensor(obj)
    lengths = comm.all_gather(torch.tensor([payload.numel()], dtype=torch.int64)).flatten()
    longest = int(lengths.max().item())
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    rows = comm.all_gather(padded)
    return [pickle.loads(rows[i, : int(lengths[i])].numpy().tobytes()) for i in range(n)]

"""Picklable Python objects over an axis (through the CPU communicator)."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from topo.active import find_context
from topo.collectives._common import check_index
from topo.errors import CommunicationError, TopoTypeError
from topo.mesh import Axis

__all__ = ["all_gather_object", "broadcast_object"]


def _to_tensor(obj: Any, operation: str) -> torch.Tensor:
    try:
        data = pickle.dumps(obj)
    except Exception as error:
        raise TopoTypeError(
            f"topo.{operation} requires a picklable object, but pickling "
            f"{type(obj).__name__} failed ({type(error).__name__}: {error}); send plain data "
            f"(or tensors through the tensor collectives)"
        ) from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


#: The length a source sends instead of a payload when it could not pickle its object, so the
#: receivers fail at once instead of waiting for bytes that never come.
_FAILED = -1


def broadcast_object(obj: Any, axis: Axis, src: int = 0) -> Any:
    """Index ``src``'s picklable ``obj`` on every rank of ``axis`` (others pass anything).

    The object travels pickled and every receiver unpickles it: use it only between the job's
    own ranks (as any object collective). If ``src`` cannot pickle ``obj`` it raises
    ``TopoTypeError`` and every receiver raises ``CommunicationError`` at once.

    Example::

        with DeviceMesh(dp=2).activate():
            config = topo.broadcast_object(config if topo.axis_index("dp") == 0 else None,
                                           axis="dp")
    """
    ctx, names, n = find_context(axis, "broadcast_object")
    root = check_index(src, n, "broadcast_object", "src", axis)
    if n == 1:
        return pickle.loads(_to_tensor(obj, "broadcast_object").numpy().tobytes())
    comm = ctx.communicator(names, "cpu")
    payload, problem = torch.empty(0, dtype=torch.uint8), None
    if comm.index == root:
        try:
            payload = _to_tensor(obj, "broadcast_object")
        except TopoTypeError as error:
            problem = error
    size = _FAILED if problem is not None else payload.numel()
    length = int(comm.broadcast(torch.tensor([size], dtype=torch.int64), root).item())
    if problem is not None:
        raise problem
    if length == _FAILED:
        raise CommunicationError(
            f"topo.broadcast_object on axis {axis!r}: the source (index {root}) could not "
            f"pickle its object and sent nothing; see the error on that rank"
        )
    if comm.index != root:
        payload = torch.empty(length, dtype=torch.uint8)
    data = comm.broadcast(payload, root)
    return pickle.loads(data.numpy().tobytes())


def all_gather_object(obj: Any, axis: Axis) -> list[Any]:
    """Every rank's picklable ``obj``, in axis-index order, on every rank of ``axis``.

    The objects travel pickled and every rank unpickles its peers' objects: use it only
    between the job's own ranks. A rank that cannot pickle its object makes every rank raise
    (``TopoTypeError`` there, ``CommunicationError`` on the others) at once.

    Example::

        with DeviceMesh(dp=2).activate():
            hosts = topo.all_gather_object(socket.gethostname(), axis="dp")
    """
    ctx, names, n = find_context(axis, "all_gather_object")
    if n == 1:
        return [pickle.loads(_to_tensor(obj, "all_gather_object").numpy().tobytes())]
    comm = ctx.communicator(names, "cpu")
    payload, problem = torch.empty(0, dtype=torch.uint8), None
    try:
        payload = _to_tensor(obj, "all_gather_object")
    except TopoTypeError as error:
        problem = error
    size = _FAILED if problem is not None else payload.numel()
    lengths = comm.all_gather(torch.tensor([size], dtype=torch.int64)).flatten()
    if problem is not None:
        raise problem
    if bool((lengths == _FAILED).any()):
        bad = [i for i in range(n) if int(lengths[i]) == _FAILED]
        raise CommunicationError(
            f"topo.all_gather_object on axis {axis!r}: index(es) {bad} could not pickle their "
            f"objects and sent nothing; see the errors on those ranks"
        )
    longest = int(lengths.max().item())
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    rows = comm.all_gather(padded)
    return [pickle.loads(rows[i, : int(lengths[i])].numpy().tobytes()) for i in range(n)]

"""Python objects over an axis (through the CPU communicator), without pickle by default.

Objects travel in topo's safe encoding (``topo.codec``: plain values, bytes and tensors;
decoding never runs code). ``allow_pickle=True`` — on every rank of the call — pickles
instead, for values the encoding cannot carry; the receivers then unpickle what their peers
sent, so use it only on a network you trust.
"""

from __future__ import annotations

from typing import Any

import torch

from topo._checks import as_bool
from topo.active import find_context
from topo.codec import decode, encode
from topo.collectives._common import check_index
from topo.errors import CommunicationError, TopoTypeError
from topo.mesh import Axis

__all__ = ["all_gather_object", "broadcast_object"]

#: Where the payloads live: gloo's CPU memory, whatever the caller's default device
#: (``torch.set_default_device``, ``with torch.device("meta"):`` around a model's init).
_CPU = torch.device("cpu")


def _to_tensor(obj: Any, operation: str, allow_pickle: bool) -> torch.Tensor:
    data = encode(obj, operation, allow_pickle)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _from_tensor(x: torch.Tensor, operation: str, allow_pickle: bool) -> Any:
    return decode(x.numpy().tobytes(), operation, allow_pickle)


#: The length a source sends instead of a payload when it could not encode its object, so the
#: receivers fail at once instead of waiting for bytes that never come.
_FAILED = -1


def broadcast_object(obj: Any, axis: Axis, src: int = 0, *, allow_pickle: bool = False) -> Any:
    """Index ``src``'s ``obj`` on every rank of ``axis`` (others pass anything).

    ``obj`` is made of plain values (None, bool, int, float, complex, str, bytes, lists,
    tuples, dicts, sets, dense tensors; see :mod:`topo.codec`) and arrives as an equal copy.
    Nothing received is unpickled unless ``allow_pickle=True`` (on every rank: only on a
    network you trust). If ``src`` cannot encode ``obj`` it raises ``TopoTypeError`` naming
    the offending part, and every receiver raises ``CommunicationError`` at once.

    Example::

        with DeviceMesh(dp=2).activate():
            config = topo.broadcast_object(config if topo.axis_index("dp") == 0 else None,
                                           axis="dp")
    """
    ctx, names, n = find_context(axis, "broadcast_object")
    root = check_index(src, n, "broadcast_object", "src", axis)
    pickled = as_bool(allow_pickle, "topo.broadcast_object allow_pickle")
    if n == 1:
        return _from_tensor(_to_tensor(obj, "broadcast_object", pickled), "broadcast_object", True)
    comm = ctx.communicator(names, "cpu")
    payload, problem = torch.empty(0, dtype=torch.uint8, device=_CPU), None
    if comm.index == root:
        try:
            payload = _to_tensor(obj, "broadcast_object", pickled)
        except TopoTypeError as error:
            problem = error
    size = _FAILED if problem is not None else payload.numel()
    length = int(comm.broadcast(torch.tensor([size], dtype=torch.int64, device=_CPU), root).item())
    if problem is not None:
        raise problem
    if length == _FAILED:
        raise CommunicationError(
            f"topo.broadcast_object on axis {axis!r}: the source (index {root}) could not "
            f"encode its object and sent nothing; see the error on that rank"
        )
    if comm.index != root:
        payload = torch.empty(length, dtype=torch.uint8, device=_CPU)
    data = comm.broadcast(payload, root)
    return _from_tensor(data, "broadcast_object", pickled)


def all_gather_object(obj: Any, axis: Axis, *, allow_pickle: bool = False) -> list[Any]:
    """Every rank's ``obj``, in axis-index order, on every rank of ``axis``.

    ``obj`` is made of plain values, as for :func:`broadcast_object`; nothing received is
    unpickled unless ``allow_pickle=True`` (on every rank: only on a network you trust). A
    rank that cannot encode its object makes every rank raise (``TopoTypeError`` there,
    ``CommunicationError`` on the others) at once.

    Example::

        with DeviceMesh(dp=2).activate():
            hosts = topo.all_gather_object(socket.gethostname(), axis="dp")
    """
    ctx, names, n = find_context(axis, "all_gather_object")
    pickled = as_bool(allow_pickle, "topo.all_gather_object allow_pickle")
    if n == 1:
        own = _to_tensor(obj, "all_gather_object", pickled)
        return [_from_tensor(own, "all_gather_object", True)]
    comm = ctx.communicator(names, "cpu")
    payload, problem = torch.empty(0, dtype=torch.uint8, device=_CPU), None
    try:
        payload = _to_tensor(obj, "all_gather_object", pickled)
    except TopoTypeError as error:
        problem = error
    size = _FAILED if problem is not None else payload.numel()
    lengths = comm.all_gather(torch.tensor([size], dtype=torch.int64, device=_CPU)).flatten()
    if problem is not None:
        raise problem
    if bool((lengths == _FAILED).any()):
        bad = [i for i in range(n) if int(lengths[i]) == _FAILED]
        raise CommunicationError(
            f"topo.all_gather_object on axis {axis!r}: index(es) {bad} could not encode their "
            f"objects and sent nothing; see the errors on those ranks"
        )
    longest = int(lengths.max().item())
    padded = torch.zeros(longest, dtype=torch.uint8, device=_CPU)
    padded[: payload.numel()] = payload
    rows = comm.all_gather(padded)
    return [
        _from_tensor(rows[i, : int(lengths[i])], "all_gather_object", pickled) for i in range(n)
    ]

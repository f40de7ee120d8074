"""Python objects point to point: send_object / recv_object.

Objects travel in topo's safe encoding (``topo.codec``: plain values, bytes and tensors;
decoding never runs code). ``allow_pickle=True`` on both sides pickles instead; the receiver
then unpickles what its peer sent, so use it only on a network you trust.
"""

from __future__ import annotations

from typing import Any

from topo._checks import as_bool
from topo.active import find_context
from topo.codec import decode, encode
from topo.collectives._common import check_peer
from topo.mesh import Axis
from topo.transport import _wire

__all__ = ["recv_object", "send_object"]


def _pair(axis: Axis, peer: object, what: str, operation: str) -> Any:
    ctx, names, n = find_context(axis, operation)
    index = check_peer(peer, n, ctx.axis_index(names), operation, what, axis)
    return ctx.pair_communicator(names, index, "cpu")


def send_object(obj: Any, axis: Axis, dst: int, *, allow_pickle: bool = False) -> None:
    """Send ``obj`` to index ``dst`` of ``axis`` (over the CPU communicator); that rank calls
    :func:`recv_object`. ``obj`` is made of plain values (None, bool, int, float, complex,
    str, bytes, lists, tuples, dicts, sets, dense tensors); ``allow_pickle=True`` (here and at
    the receiver: only on a network you trust) sends anything picklable.

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 0:
                topo.send_object({"step": 3, "schedule": [0, 1]}, axis="pp", dst=1)
    """
    pickled = as_bool(allow_pickle, "topo.send_object allow_pickle")
    comm = _pair(axis, dst, "dst", "send_object")
    _wire.send_bytes(comm, encode(obj, "send_object", pickled), 1 - comm.index)


def recv_object(axis: Axis, src: int, *, allow_pickle: bool = False) -> Any:
    """Receive the object index ``src`` of ``axis`` sent with :func:`send_object`. Nothing is
    unpickled unless ``allow_pickle=True`` (a pickle can run any code: only on a network you
    trust).

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 1:
                plan = topo.recv_object(axis="pp", src=0)
    """
    pickled = as_bool(allow_pickle, "topo.recv_object allow_pickle")
    comm = _pair(axis, src, "src", "recv_object")
    return decode(_wire.recv_bytes(comm, 1 - comm.index), "recv_object", pickled)

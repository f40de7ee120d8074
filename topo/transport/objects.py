"""Picklable objects point to point: send_object / recv_object.

These pickle: the receiver unpickles what the sending rank sent, so use them only between
the job's own peers (the ranks of one activation), never across a trust boundary. Tensor
dicts (:func:`topo.send_tensor_dict`) carry their metadata as JSON instead.
"""

from __future__ import annotations

import pickle
from typing import Any

from topo.active import find_context
from topo.collectives._common import check_peer
from topo.mesh import Axis
from topo.transport import _wire

__all__ = ["recv_object", "send_object"]


def _pair(axis: Axis, peer: object, what: str, operation: str) -> Any:
    ctx, names, n = find_context(axis, operation)
    index = check_peer(peer, n, ctx.axis_index(names), operation, what, axis)
    return ctx.pair_communicator(names, index, "cpu")


def send_object(obj: Any, axis: Axis, dst: int) -> None:
    """Send a picklable ``obj`` to index ``dst`` of ``axis`` (over the CPU communicator); that
    rank calls :func:`recv_object`. The receiver *unpickles* it: peers of one job only.

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 0:
                topo.send_object({"step": 3, "schedule": [0, 1]}, axis="pp", dst=1)
    """
    comm = _pair(axis, dst, "dst", "send_object")
    _wire.send_bytes(comm, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), 1 - comm.index)


def recv_object(axis: Axis, src: int) -> Any:
    """Receive the object index ``src`` of ``axis`` sent with :func:`send_object`. This
    unpickles the peer's bytes (which can run code): use it only between the job's own ranks.

    Example::

        with DeviceMesh(pp=2).activate():
            if topo.axis_index("pp") == 1:
                plan = topo.recv_object(axis="pp", src=0)
    """
    comm = _pair(axis, src, "src", "recv_object")
    return pickle.loads(_wire.recv_bytes(comm, 1 - comm.index))

"""topo: device-mesh topology for distributed deep learning.

Declare an immutable :class:`DeviceMesh`, compute any rank's groups and neighbours with pure
functions, and turn the spec into live communicators with ``mesh.activate()``; collectives are
free functions that name an axis.

Example::

    import topo

    mesh = topo.DeviceMesh(dp=2, pp=2, tp=2)
    mesh.group("tp", 5)                        # (4, 5)
    with mesh.activate():
        y = topo.all_reduce(x, axis="tp")

``import topo`` is light: the rank math needs no torch, and the runtime (which imports torch)
loads on first use of one of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from topo.mesh import Axis, DeviceMesh, Placement, parse_mesh

if TYPE_CHECKING:
    from topo.collectives import (
        all_gather,
        all_gather_object,
        all_reduce,
        all_to_all,
        axis_index,
        axis_size,
        barrier,
        broadcast,
        broadcast_object,
        gather,
        ppermute,
        recv,
        reduce_scatter,
        scatter,
        send,
        shift,
    )
    from topo.context import MeshContext, activate, active_contexts, current
    from topo.coordinator import Coordinator
    from topo.errors import (
        BackendUnavailableError,
        CommunicationError,
        CommunicationTimeout,
        NoActiveMeshError,
        RankFailedError,
        RendezvousError,
        RendezvousTimeout,
        StoreLostError,
        TopoError,
    )
    from topo.graphs import graph_capture
    from topo.launch import spawn
    from topo.world import World, WorldError

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        [
            "all_gather",
            "all_gather_object",
            "all_reduce",
            "all_to_all",
            "axis_index",
            "axis_size",
            "barrier",
            "broadcast",
            "broadcast_object",
            "gather",
            "ppermute",
            "recv",
            "reduce_scatter",
            "scatter",
            "send",
            "shift",
        ],
        "topo.collectives",
    ),
    **dict.fromkeys(["MeshContext", "activate", "active_contexts", "current"], "topo.context"),
    "Coordinator": "topo.coordinator",
    **dict.fromkeys(
        [
            "BackendUnavailableError",
            "CommunicationError",
            "CommunicationTimeout",
            "NoActiveMeshError",
            "RankFailedError",
            "RendezvousError",
            "RendezvousTimeout",
            "StoreLostError",
            "TopoError",
        ],
        "topo.errors",
    ),
    "graph_capture": "topo.graphs",
    "spawn": "topo.launch",
    "World": "topo.world",
    "WorldError": "topo.world",
}

__all__ = [
    "Axis",
    "BackendUnavailableError",
    "CommunicationError",
    "CommunicationTimeout",
    "Coordinator",
    "DeviceMesh",
    "MeshContext",
    "NoActiveMeshError",
    "Placement",
    "RankFailedError",
    "RendezvousError",
    "RendezvousTimeout",
    "StoreLostError",
    "TopoError",
    "World",
    "WorldError",
    "activate",
    "active_contexts",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "axis_index",
    "axis_size",
    "barrier",
    "broadcast",
    "broadcast_object",
    "current",
    "gather",
    "graph_capture",
    "parse_mesh",
    "ppermute",
    "recv",
    "reduce_scatter",
    "scatter",
    "send",
    "shift",
    "spawn",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'topo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""``topo.ray.spawn``: run one function on every rank of a mesh, one Ray actor per rank.

The Ray counterpart of :func:`topo.spawn`: the same call, the ranks placed on a Ray cluster
by the mesh's node placement instead of started as local processes. It starts
:class:`topo.ray.MeshActors`, runs the function once and ends them; ``timeout`` bounds the
whole of it.

Example::

    results = topo.ray.spawn(work, topo.DeviceMesh(dp=2, tp=2))   # per-rank results
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from topo._checks import as_seconds
from topo.errors import TopoTypeError
from topo.mesh import DeviceMesh
from topo.ray.actors import MeshActors

__all__ = ["spawn"]


def spawn(
    fn: Callable[..., Any],
    mesh: DeviceMesh,
    *args: Any,
    resources_per_rank: Mapping[str, float] | None = None,
    num_gpus: float = 0,
    ranks_per_node: int | None = None,
    timeout: float = 300.0,
    activation_timeout: float | None = None,
    runtime_env: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on every rank of ``mesh``, one Ray actor per rank; return the
    per-rank results in rank order.

    Each rank's actor activates ``mesh`` with an explicit :class:`topo.World` (rank 0's actor
    hosts the store at its node's address; a fresh secret authenticates every store value)
    and calls ``fn`` inside it. Ranks take ``resources_per_rank`` (default ``{"CPU": 1}``)
    and ``num_gpus`` GPUs each, ``ranks_per_node`` to a Ray node (default: all on one; see
    :func:`topo.ray.ray_plan`). ``timeout`` bounds the whole call in seconds,
    ``activation_timeout`` (default: ``timeout``) each wait inside the ranks. A rank that
    raises, or whose actor dies, is named by :class:`topo.RankFailedError`; every actor is
    ended before spawn returns or raises. ``fn`` travels by Ray's serialization: a function
    of the driver script or of a module Ray's workers can import (``runtime_env``).

    Example::

        def work():
            return topo.all_reduce(torch.ones(2), axis="tp")

        ray.init()
        topo.ray.spawn(work, topo.DeviceMesh(dp=2, tp=2))   # 4 × tensor([2., 2.])
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(
            f"topo.ray.spawn mesh requires a topo.DeviceMesh, but got {type(mesh).__name__}"
        )
    if not callable(fn):
        raise TopoTypeError(f"topo.ray.spawn fn requires a callable, but got {type(fn).__name__}")
    seconds = as_seconds(timeout, "topo.ray.spawn timeout")
    inner = (
        seconds
        if activation_timeout is None
        else as_seconds(activation_timeout, "topo.ray.spawn activation_timeout")
    )
    deadline = time.monotonic() + seconds
    actors = MeshActors(
        mesh,
        resources_per_rank=resources_per_rank,
        num_gpus=num_gpus,
        ranks_per_node=ranks_per_node,
        activation_timeout=inner,
        start_timeout=seconds,
        runtime_env=runtime_env,
    )
    try:
        results = actors.run(fn, *args, timeout=max(deadline - time.monotonic(), 0.001))
        actors.close(timeout=max(deadline - time.monotonic(), 1.0))
        return results
    finally:
        actors._stop()

"""The bridge: one stateless group across two jobs (a trainer and an inference mesh).

Each process of both jobs opens the bridge with the same address, port and world size and its
own bridge rank; the result is an active one-axis mesh (axis ``"bridge"``) on which
:func:`~topo.transfer.send_weights` / :func:`~topo.transfer.receive_weights` run. The bridge
rank 0 (the trainer, by default) hosts the rendezvous store at ``address:port``. Inference
workers take the seed engine's ranks::

    worker_rank = dp_rank * world_size_per_dp + rank_within_dp + rank_offset

with ``world_size_per_dp = tp * pp`` and ``rank_offset`` the number of trainer ranks (1).
The bridge is separate from both jobs' own meshes (its own store, its own activation name), so
it nests inside an active inference mesh.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from topo._checks import as_host, as_int, as_port
from topo.context import MeshContext, activate
from topo.mesh import DeviceMesh
from topo.world import World

__all__ = ["bridge", "worker_rank"]


def worker_rank(
    dp_rank: int, rank_within_dp: int, world_size_per_dp: int, rank_offset: int = 1
) -> int:
    """An inference worker's bridge rank: ``dp_rank * world_size_per_dp + rank_within_dp +
    rank_offset`` (the seed engine's formula; ``rank_offset`` = number of trainer ranks).

    Example::

        >>> worker_rank(dp_rank=1, rank_within_dp=0, world_size_per_dp=2)   # tp=2, pp=1
        3
    """
    per_dp = as_int(world_size_per_dp, "topo.transfer.worker_rank world_size_per_dp", minimum=1)
    within = as_int(rank_within_dp, "topo.transfer.worker_rank rank_within_dp", minimum=0,
                    maximum=per_dp - 1)  # fmt: skip
    dp = as_int(dp_rank, "topo.transfer.worker_rank dp_rank", minimum=0)
    offset = as_int(rank_offset, "topo.transfer.worker_rank rank_offset", minimum=0)
    return dp * per_dp + within + offset


@contextmanager
def bridge(
    address: str,
    port: int,
    rank: int,
    world_size: int,
    *,
    timeout: float | timedelta | None = None,
    name: str = "bridge",
    device: torch.device | str | int | None = None,
    secret: bytes | str | None = None,
    bind: str | None = None,
) -> Iterator[MeshContext]:
    """Join the stateless group of ``world_size`` processes at ``address:port`` as ``rank``;
    yields the active context of ``DeviceMesh(bridge=world_size)``. Rank 0 hosts the store.
    ``device`` is the CUDA device for NCCL transfers; by default this process's current CUDA
    device (``torch.cuda.current_device()``, as the seed engine), never one derived from the
    bridge rank. ``secret`` (default ``TOPO_SECRET``) authenticates every value in the bridge's
    store, as for :func:`topo.activate`; both sides need the same one. ``address`` must be the
    bridge host's address: a wildcard (``0.0.0.0``) is refused unless ``bind`` names it.

    Example::

        # trainer
        with topo.transfer.bridge("10.0.0.1", 29600, rank=0, world_size=5):
            topo.transfer.send_weights(model.named_parameters(), axis="bridge")
        # each inference worker (inside its own dp=2 x tp=2 mesh)
        r = topo.transfer.worker_rank(dp_rank, tp_rank, world_size_per_dp=2)
        with topo.transfer.bridge("10.0.0.1", 29600, rank=r, world_size=5):
            topo.transfer.receive_weights("bridge", load=load)
    """
    host = as_host(address, "topo.transfer.bridge address")
    size = as_int(world_size, "topo.transfer.bridge world_size", minimum=2)
    me = as_int(rank, "topo.transfer.bridge rank", minimum=0, maximum=size - 1)
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    world = World(
        rank=me,
        world_size=size,
        local_rank=me if loopback else 0,
        local_world_size=size if loopback else 1,
        master_addr=host,
        master_port=as_port(port, "topo.transfer.bridge port"),
    )
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = DeviceMesh(bridge=size)
    with activate(
        mesh, world, timeout=timeout, name=name, device=device, secret=secret, bind=bind
    ) as ctx:
        yield ctx

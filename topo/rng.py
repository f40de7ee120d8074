"""Per-rank random streams: a ``torch.Generator`` seeded from a seed and the rank's place.

Seeding with ``torch.manual_seed`` inside a rank function is fine in processes (``topo.spawn``,
torchrun), but under ``topo.simulate`` every rank is a thread of one process and they share
torch's global generator: a seed set by one rank is consumed by another, and the draws race.
:func:`rank_generator` gives each rank its own generator, the same under simulate, spawn and
torchrun, so initialisation is reproducible everywhere.

Example::

    def init(rows: int) -> torch.Tensor:
        g = topo.rank_generator(0, axis="tp")     # the tp shards differ, dp replicas agree
        return torch.randn(rows, 8, generator=g)

    topo.simulate(topo.DeviceMesh(dp=2, tp=2), init, 4)
"""

from __future__ import annotations

import hashlib

import torch

from topo._checks import as_int
from topo.active import current
from topo.errors import TopoTypeError
from topo.mesh import Axis

__all__ = ["rank_generator"]


def rank_generator(
    seed: int, axis: Axis | None = None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A new ``torch.Generator`` on ``device`` for this rank of the innermost active mesh,
    seeded from ``seed`` and the rank's index along ``axis`` (default: every axis, so each
    rank has its own stream). Ranks with the same index along ``axis`` get the same stream:
    ``axis="tp"`` draws different tensor-parallel shards and identical data-parallel replicas.

    Example::

        with topo.DeviceMesh(dp=2, tp=2).activate():
            w = torch.randn(4, 4, generator=topo.rank_generator(1234, axis="tp"))
    """
    seed = as_int(seed, "rank_generator seed", minimum=0)
    if not isinstance(device, (str, torch.device)):
        raise TopoTypeError(
            f"rank_generator device requires a torch.device or a str such as 'cpu' or "
            f"'cuda:0', but got {type(device).__name__}"
        )
    ctx = current()
    names = ctx.mesh.axis_names if axis is None else ctx.resolve(axis)[0]
    index = ctx.axis_index(names)
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix(seed, names, index))
    return generator


def _mix(seed: int, names: tuple[str, ...], index: int) -> int:
    """A 63-bit seed from (seed, axis names, index): independent-looking streams for nearby
    seeds and indices (not ``seed + index``, where rank 1's seed 0 is rank 0's seed 1)."""
    text = f"{seed}/{','.join(names)}/{index}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1

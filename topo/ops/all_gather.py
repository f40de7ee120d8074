"""topo::all_gather: custom op, fake implementation and autograd rule.

Backward: reduce_scatter(g, dim, sum) (each rank's slice, summed over every rank's loss).
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import concat_chunks
from topo.communicators.base import plain
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("all_gather", "(Tensor x, str group, int n, int dim) -> Tensor")
def all_gather(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "all_gather")
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return concat_chunks(comm.all_gather(plain(x)), dim)


@all_gather.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] *= n
    return x.new_empty(shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.dim = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dx = torch.ops.topo.reduce_scatter(g, ctx.group, ctx.n, ctx.dim, "sum")
    return dx, None, None, None


register_autograd(all_gather, _backward, _setup)
mark_side_effects(torch.ops.topo.all_gather.default)

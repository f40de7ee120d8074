"""topo::all_to_allv: custom op, fake implementation and autograd rule.

Backward: all_to_allv(g) with ``send_sizes`` and ``recv_sizes`` swapped — every row goes back
to the index it came from. The sizes are ``SymInt[]`` arguments (ints that may be symbolic):
a compiled graph is traced once with the sizes as constants and, when they change, once more
with symbolic sizes (dynamo's automatic dynamic shapes), which then serves every table.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives.uneven import alltoallv
from topo.errors import TopoValueError
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define(
    "all_to_allv",
    "(Tensor x, str group, int n, SymInt[] send_sizes, SymInt[] recv_sizes, int dim) -> Tensor",
)
def all_to_allv(
    x: torch.Tensor,
    group: str,
    n: int,
    send_sizes: list[int],
    recv_sizes: list[int],
    dim: int,
) -> torch.Tensor:
    comm, index = live(group, n, x.device.type, "all_to_allv")
    if send_sizes[index] != recv_sizes[index]:  # traced for another index of the axis
        raise TopoValueError(
            f"topo.all_to_allv recv_sizes[{index}] requires this rank's send_sizes[{index}] "
            f"({send_sizes[index]}), but got {recv_sizes[index]}; compile the function again "
            f"for this rank (torch._dynamo.reset())"
        )
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return alltoallv(comm, x, dim, list(send_sizes), list(recv_sizes))


@all_to_allv.register_fake  # type: ignore[untyped-decorator]
def _fake(
    x: torch.Tensor,
    group: str,
    n: int,
    send_sizes: list[int],
    recv_sizes: list[int],
    dim: int,
) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = sum(recv_sizes)
    return x.new_empty(shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.send_sizes, ctx.recv_sizes, ctx.dim = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dx = torch.ops.topo.all_to_allv(g, ctx.group, ctx.n, ctx.recv_sizes, ctx.send_sizes, ctx.dim)
    return dx, None, None, None, None, None


register_autograd(all_to_allv, _backward, _setup)
mark_side_effects(torch.ops.topo.all_to_allv.default)

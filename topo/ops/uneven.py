"""topo::all_gatherv and topo::reduce_scatterv: custom ops, fake implementations and autograd
rules; each is the other's adjoint.

Backward of all_gatherv: reduce_scatterv(g, sizes, "sum") — index ``i``'s rows of every
rank's cotangent, summed. Backward of reduce_scatterv: all_gatherv(g, sizes) for ``sum`` (÷ n
for ``avg``); ``max``/``min``/``prod`` raise NotDifferentiableError. The sizes are ``SymInt[]``
arguments (symbolic in a graph traced again for new sizes, as ``topo::all_to_allv``'s);
reduce_scatterv also carries ``rows``, this rank's part (its result's size along ``dim``) as
seen when it was called or traced.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives.uneven import gatherv, scatterv
from topo.errors import TopoValueError
from topo.ops._library import define, live, mark_side_effects, register_autograd
from topo.ops.no_grad import reduce_op_backward

__all__: list[str] = []


def _retrace(operation: str, index: int, what: str, expected: int, got: int) -> TopoValueError:
    return TopoValueError(
        f"topo.{operation} sizes[{index}] requires {what} ({expected}), but got {got}: the "
        f"call was traced for another index of the axis; compile the function again for this "
        f"rank (torch._dynamo.reset())"
    )


@define(
    "all_gatherv", "(Tensor x, str group, int n, SymInt[] sizes, int dim, str method) -> Tensor"
)
def all_gatherv(
    x: torch.Tensor, group: str, n: int, sizes: list[int], dim: int, method: str
) -> torch.Tensor:
    comm, index = live(group, n, x.device.type, "all_gatherv")
    if sizes[index] != x.shape[dim]:
        raise _retrace(
            "all_gatherv", index, f"this rank's x.shape[{dim}]", x.shape[dim], sizes[index]
        )
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return gatherv(comm, x, dim, list(sizes), method)  # type: ignore[arg-type]


@all_gatherv.register_fake  # type: ignore[untyped-decorator]
def _all_gatherv_fake(
    x: torch.Tensor, group: str, n: int, sizes: list[int], dim: int, method: str
) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    return x.new_empty(shape)


def _all_gatherv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, ctx.group, ctx.n, ctx.sizes, ctx.dim, _ = inputs
    ctx.rows = x.shape[ctx.dim]


def _all_gatherv_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dx = torch.ops.topo.reduce_scatterv(g, ctx.group, ctx.n, ctx.sizes, ctx.rows, ctx.dim, "sum")
    return dx, None, None, None, None, None


@define(
    "reduce_scatterv",
    "(Tensor x, str group, int n, SymInt[] sizes, SymInt rows, int dim, str op) -> Tensor",
)
def reduce_scatterv(
    x: torch.Tensor, group: str, n: int, sizes: list[int], rows: int, dim: int, op: str
) -> torch.Tensor:
    comm, index = live(group, n, x.device.type, "reduce_scatterv")
    if sizes[index] != rows:
        raise _retrace("reduce_scatterv", index, "the rows traced", rows, sizes[index])
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return scatterv(comm, x, dim, list(sizes), op)  # type: ignore[arg-type]


@reduce_scatterv.register_fake  # type: ignore[untyped-decorator]
def _reduce_scatterv_fake(
    x: torch.Tensor, group: str, n: int, sizes: list[int], rows: int, dim: int, op: str
) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = rows
    return x.new_empty(shape)


def _reduce_scatterv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.group, ctx.n, ctx.sizes, _, ctx.dim, ctx.op = inputs


def _reduce_scatterv_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    nones = (None,) * 6
    if ctx.op not in ("sum", "avg"):
        return reduce_op_backward("reduce_scatterv", ctx.op, g), *nones
    dx = torch.ops.topo.all_gatherv(g, ctx.group, ctx.n, ctx.sizes, ctx.dim, "auto")
    if ctx.op == "avg":
        dx = dx / ctx.n
    return dx, *nones


register_autograd(all_gatherv, _all_gatherv_backward, _all_gatherv_setup)
register_autograd(reduce_scatterv, _reduce_scatterv_backward, _reduce_scatterv_setup)
mark_side_effects(torch.ops.topo.all_gatherv.default)
mark_side_effects(torch.ops.topo.reduce_scatterv.default)

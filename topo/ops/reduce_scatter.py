"""topo::reduce_scatter: custom op, fake implementation and autograd rule.

Backward: all_gather(g, dim) for ``sum`` (÷ n for ``avg``); ``max``/``min``/``prod`` raise
NotDifferentiableError.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import stack_chunks
from topo.ops._library import define, live, mark_side_effects, register_autograd
from topo.ops.no_grad import reduce_op_backward

__all__: list[str] = []


@define("reduce_scatter", "(Tensor x, str group, int n, int dim, str op) -> Tensor")
def reduce_scatter(x: torch.Tensor, group: str, n: int, dim: int, op: str) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "reduce_scatter")
    stacked = stack_chunks(x, dim, n, "reduce_scatter", group)
    if comm is None:
        return stacked[0].clone()
    return comm.reduce_scatter(stacked, op)  # type: ignore[arg-type]


@reduce_scatter.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, dim: int, op: str) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] //= n
    return x.new_empty(shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.dim, ctx.op = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if ctx.op not in ("sum", "avg"):
        return reduce_op_backward("reduce_scatter", ctx.op, g), None, None, None, None
    dx = torch.ops.topo.all_gather(g, ctx.group, ctx.n, ctx.dim)
    if ctx.op == "avg":
        dx = dx / ctx.n
    return dx, None, None, None, None


register_autograd(reduce_scatter, _backward, _setup)
mark_side_effects(torch.ops.topo.reduce_scatter.default)

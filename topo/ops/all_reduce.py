"""topo::all_reduce: custom op, fake implementation and autograd rule.

Backward (the derivative of the sum of every rank's loss): ``sum`` → all_reduce(g, sum),
``avg`` → all_reduce(g, avg); ``max``/``min``/``prod`` raise NotDifferentiableError.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.communicators.base import plain
from topo.ops._library import define, live, mark_side_effects, register_autograd
from topo.ops.no_grad import reduce_op_backward

__all__: list[str] = []


@define("all_reduce", "(Tensor x, str group, int n, str op) -> Tensor")
def all_reduce(x: torch.Tensor, group: str, n: int, op: str) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "all_reduce")
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return comm.all_reduce(plain(x), op)  # type: ignore[arg-type]


@all_reduce.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, op: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.op = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if ctx.op not in ("sum", "avg"):
        return reduce_op_backward("all_reduce", ctx.op, g), None, None, None
    return torch.ops.topo.all_reduce(g, ctx.group, ctx.n, ctx.op), None, None, None


register_autograd(all_reduce, _backward, _setup)
mark_side_effects(torch.ops.topo.all_reduce.default)

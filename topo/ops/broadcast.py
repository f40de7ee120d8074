"""topo::broadcast and its adjoint topo::reduce: custom ops, fake implementations, autograd.

broadcast(src) backward: the sum of g over the axis on ``src``, zeros on the other ranks — that
is reduce(g, dst=src). reduce(dst) (sum on ``dst``, zeros elsewhere; used only as broadcast's
backward) has broadcast(g, src=dst) as its own backward, so double backward works too.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.communicators.base import plain
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("broadcast", "(Tensor x, str group, int n, int src) -> Tensor")
def broadcast(x: torch.Tensor, group: str, n: int, src: int) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "broadcast")
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    return comm.broadcast(plain(x), src)


@define("reduce", "(Tensor x, str group, int n, int dst) -> Tensor")
def reduce(x: torch.Tensor, group: str, n: int, dst: int) -> torch.Tensor:
    comm, index = live(group, n, x.device.type, "reduce")
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    y = comm.all_reduce(plain(x), "sum")
    return y if index == dst else y.zero_()


def _fake(x: torch.Tensor, group: str, n: int, root: int) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.root = inputs[1:]


def _broadcast_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.reduce(g, ctx.group, ctx.n, ctx.root), None, None, None


def _reduce_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.broadcast(g, ctx.group, ctx.n, ctx.root), None, None, None


broadcast.register_fake(_fake)
reduce.register_fake(_fake)
register_autograd(broadcast, _broadcast_backward, _setup)
register_autograd(reduce, _reduce_backward, _setup)
mark_side_effects(torch.ops.topo.broadcast.default)
mark_side_effects(torch.ops.topo.reduce.default)

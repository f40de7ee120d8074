"""topo::scatter: custom op, fake implementation and autograd rule.

Backward: gather(g, dst=src, dim) on ``src`` (every index's chunk of the cotangent back in
place), zeros on the other ranks — their ``x`` is not read.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import stack_chunks
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("scatter", "(Tensor x, str group, int n, int src, int dim) -> Tensor")
def scatter(x: torch.Tensor, group: str, n: int, src: int, dim: int) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "scatter")
    stacked = stack_chunks(x, dim, n, "scatter", group)
    if comm is None:
        return stacked[0].clone()
    return comm.scatter(stacked, src)


@scatter.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, src: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] //= n
    return x.new_empty(shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.src, ctx.dim = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dx = torch.ops.topo.gather(g, ctx.group, ctx.n, ctx.src, ctx.dim)
    return dx, None, None, None, None


register_autograd(scatter, _backward, _setup)
mark_side_effects(torch.ops.topo.scatter.default)

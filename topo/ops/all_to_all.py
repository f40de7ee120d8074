"""topo::all_to_all: custom op, fake implementation and autograd rule.

Backward: all_to_all(g, split_dim=concat_dim, concat_dim=split_dim) — the chunks go back to
where they came from.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import concat_chunks, stack_chunks
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("all_to_all", "(Tensor x, str group, int n, int split_dim, int concat_dim) -> Tensor")
def all_to_all(
    x: torch.Tensor, group: str, n: int, split_dim: int, concat_dim: int
) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "all_to_all")
    stacked = stack_chunks(x, split_dim, n, "all_to_all", group)
    stacked = comm.all_to_all(stacked) if comm is not None else stacked.clone()
    return concat_chunks(stacked, concat_dim)


@all_to_all.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, split_dim: int, concat_dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[split_dim] //= n
    shape[concat_dim] *= n
    return x.new_empty(shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.split_dim, ctx.concat_dim = inputs[1:]


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    dx = torch.ops.topo.all_to_all(g, ctx.group, ctx.n, ctx.concat_dim, ctx.split_dim)
    return dx, None, None, None, None


register_autograd(all_to_all, _backward, _setup)
mark_side_effects(torch.ops.topo.all_to_all.default)

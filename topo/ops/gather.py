"""topo::gather and the local chunk ops: custom ops, fake implementations, autograd rules.

``topo::gather`` returns the concatenation on ``dst`` and zeros of the same shape elsewhere
(:func:`topo.gather` turns those into ``None``). Its backward is local: this rank's own slice
of g (``topo::chunk``). On ``dst`` that is the exact gradient; :func:`topo.gather` refuses
``x`` that requires grad off ``dst`` (whose exact gradient would need ``dst``'s cotangent).

``topo::chunk`` (this rank's chunk along ``dim``) and ``topo::unchunk`` (g at this rank's slot,
zeros elsewhere) are each other's adjoints; the Megatron regions use them too. The rank's
index is resolved when the op runs, never frozen into a compiled graph.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import concat_chunks
from topo.communicators.base import plain
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("gather", "(Tensor x, str group, int n, int dst, int dim) -> Tensor")
def gather(x: torch.Tensor, group: str, n: int, dst: int, dim: int) -> torch.Tensor:
    comm, _ = live(group, n, x.device.type, "gather")
    if comm is None:
        return x.clone(memory_format=torch.contiguous_format)
    stacked = comm.gather(plain(x), dst)
    if stacked is None:
        shape = list(x.shape)
        shape[dim] *= n
        return x.new_zeros(shape)
    return concat_chunks(stacked, dim)


@gather.register_fake  # type: ignore[untyped-decorator]
def _gather_fake(x: torch.Tensor, group: str, n: int, dst: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] *= n
    return x.new_empty(shape)


def _gather_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, _, ctx.dim = inputs[1:]


def _gather_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.chunk(g, ctx.group, ctx.n, ctx.dim), None, None, None, None


@define("chunk", "(Tensor x, str group, int n, int dim) -> Tensor")
def chunk(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    _, index = live(group, n, x.device.type, "chunk")
    size = x.shape[dim] // n
    return x.narrow(dim, index * size, size).clone(memory_format=torch.contiguous_format)


@chunk.register_fake  # type: ignore[untyped-decorator]
def _chunk_fake(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] //= n
    return x.new_empty(shape)


@define("unchunk", "(Tensor x, str group, int n, int dim) -> Tensor")
def unchunk(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    _, index = live(group, n, x.device.type, "unchunk")
    shape = list(x.shape)
    shape[dim] *= n
    out = x.new_zeros(shape)
    out.narrow(dim, index * x.shape[dim], x.shape[dim]).copy_(x)
    return out


@unchunk.register_fake  # type: ignore[untyped-decorator]
def _unchunk_fake(x: torch.Tensor, group: str, n: int, dim: int) -> torch.Tensor:
    result: torch.Tensor = _gather_fake(x, group, n, 0, dim)
    return result


def _chunk_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, ctx.dim = inputs[1:]


def _chunk_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.unchunk(g, ctx.group, ctx.n, ctx.dim), None, None, None


def _unchunk_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.chunk(g, ctx.group, ctx.n, ctx.dim), None, None, None


register_autograd(gather, _gather_backward, _gather_setup)
register_autograd(chunk, _chunk_backward, _chunk_setup)
register_autograd(unchunk, _unchunk_backward, _chunk_setup)
mark_side_effects(torch.ops.topo.gather.default)

"""Megatron-LM's four tensor-parallel autograd regions, by axis name.

In a tensor-parallel layer every rank of the axis computes the *same* loss. These regions pair a
forward with the backward that gives the gradient of that one loss (Megatron's convention),
whereas topo's collectives on their own give the gradient of the *sum* of every rank's loss
(JAX's convention; see docs/autograd.md):

=====================  ======================  ======================
region                 forward                 backward
=====================  ======================  ======================
``copy_to(x)``         identity                all_reduce(g, sum)
``reduce_from(x)``     all_reduce(x, sum)      identity
``scatter_to(x, d)``   this rank's chunk       all_gather(g, d)
``gather_from(x, d)``  all_gather(x, d)        this rank's chunk of g
=====================  ======================  ======================

They run through topo's custom ops, so they work under ``torch.compile`` too.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.collectives._common import check_dim, device_type, stack_chunks
from topo.mesh import Axis
from topo.ops._library import call, group_of

__all__ = ["copy_to", "gather_from", "reduce_from", "scatter_to"]


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str, n: int) -> torch.Tensor:
        ctx.key, ctx.n = key, n
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return torch.ops.topo.all_reduce(g, ctx.key, ctx.n, "sum"), None, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str, n: int) -> torch.Tensor:
        result: torch.Tensor = call("all_reduce", x, key, n, "sum")
        return result

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return g, None, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str, n: int, dim: int) -> torch.Tensor:
        ctx.key, ctx.n, ctx.dim = key, n, dim
        result: torch.Tensor = call("chunk", x, key, n, dim)
        return result

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return torch.ops.topo.all_gather(g, ctx.key, ctx.n, ctx.dim), None, None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str, n: int, dim: int) -> torch.Tensor:
        ctx.key, ctx.n, ctx.dim = key, n, dim
        result: torch.Tensor = call("all_gather", x, key, n, dim)
        return result

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return torch.ops.topo.chunk(g, ctx.key, ctx.n, ctx.dim), None, None, None


def _group(x: torch.Tensor, axis: Axis, operation: str) -> tuple[str, int]:
    device_type(x, operation)
    key, n, _ = group_of(axis, operation)
    return key, n


def copy_to(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums) the gradient over ``axis``.

    Put it where a replicated activation enters a column-parallel layer: each rank's partial
    input gradient is summed into the full one.

    Example::

        h = topo.autograd.copy_to(x, "tp") @ w1_shard        # column-parallel linear
    """
    key, n = _group(x, axis, "autograd.copy_to")
    result: torch.Tensor = _CopyTo.apply(x, key, n)  # type: ignore[no-untyped-call]
    return result


def reduce_from(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All-reduce (sum) forward over ``axis``; identity backward.

    Put it where a row-parallel layer's partial sums leave: every rank gets the full output,
    and the gradient of the (replicated) loss passes through unchanged.

    Example::

        y = topo.autograd.reduce_from(a @ w2_shard, "tp")   # row-parallel linear
    """
    key, n = _group(x, axis, "autograd.reduce_from")
    result: torch.Tensor = _ReduceFrom.apply(x, key, n)  # type: ignore[no-untyped-call]
    return result


def scatter_to(x: torch.Tensor, axis: Axis, dim: int = -1) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` forward; backward all-gathers the gradient.

    ``x.shape[dim]`` must be divisible by the axis size.

    Example::

        x_local = topo.autograd.scatter_to(x, "tp", dim=-1)   # (B, H) -> (B, H / n)
    """
    key, n = _group(x, axis, "autograd.scatter_to")
    d = check_dim(x, dim, "autograd.scatter_to")
    if x.shape[d] % n:
        stack_chunks(x, d, n, "autograd.scatter_to", axis)  # raises the divisibility error
    result: torch.Tensor = _ScatterTo.apply(x, key, n, d)  # type: ignore[no-untyped-call]
    return result


def gather_from(x: torch.Tensor, axis: Axis, dim: int = -1) -> torch.Tensor:
    """All-gather forward along ``dim``; backward keeps this rank's chunk of the gradient.

    Example::

        logits = topo.autograd.gather_from(local_logits, "tp", dim=-1)   # (B, V / n) -> (B, V)
    """
    key, n = _group(x, axis, "autograd.gather_from")
    d = check_dim(x, dim, "autograd.gather_from")
    result: torch.Tensor = _GatherFrom.apply(x, key, n, d)  # type: ignore[no-untyped-call]
    return result

"""topo::ppermute (also :func:`topo.shift`): custom op, fake implementation and autograd rule.

``perm`` travels flattened, ``[src0, dst0, src1, dst1, ...]``; each rank finds its own send
and receive when the op runs. Backward: ppermute(g, the inverse permutation) — index ``src``
gets back what its receiver's cotangent holds; a rank that sent nothing gets zeros.
"""

from __future__ import annotations

from typing import Any

import torch

from topo.communicators.base import plain
from topo.ops._library import define, live, mark_side_effects, register_autograd

__all__: list[str] = []


@define("ppermute", "(Tensor x, str group, int n, int[] perm) -> Tensor")
def ppermute(x: torch.Tensor, group: str, n: int, perm: list[int]) -> torch.Tensor:
    comm, me = live(group, n, x.device.type, "ppermute")
    pairs = list(zip(perm[::2], perm[1::2], strict=True))
    dst = next((d for s, d in pairs if s == me), None)
    src = next((s for s, d in pairs if d == me), None)
    if dst == me and src == me:
        return x.clone(memory_format=torch.contiguous_format)
    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
    if comm is not None:
        sends = [] if dst is None else [(dst, plain(x))]
        recvs = [] if src is None else [(src, out)]
        comm.exchange(sends, recvs)
    return out


@ppermute.register_fake  # type: ignore[untyped-decorator]
def _fake(x: torch.Tensor, group: str, n: int, perm: list[int]) -> torch.Tensor:
    return x.new_empty(x.shape)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group, ctx.n, perm = inputs[1:]
    inverse: list[int] = []
    for s, d in zip(perm[::2], perm[1::2], strict=True):
        inverse += [d, s]
    ctx.inverse = inverse


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return torch.ops.topo.ppermute(g, ctx.group, ctx.n, ctx.inverse), None, None, None


register_autograd(ppermute, _backward, _setup)
mark_side_effects(torch.ops.topo.ppermute.default)

"""topo::not_differentiable: the backward of a collective that has no gradient.

A backward rule cannot simply raise: torch.compile traces the backward while compiling the
forward, so a forward-only ``max`` all_reduce would fail to compile. The rule calls this op
instead; it raises :class:`~topo.errors.NotDifferentiableError` when the backward actually runs.
"""

from __future__ import annotations

import torch

from topo.errors import NotDifferentiableError
from topo.ops._library import define, mark_side_effects

__all__: list[str] = []


@define("not_differentiable", "(Tensor g, str operation, str why) -> Tensor")
def not_differentiable(g: torch.Tensor, operation: str, why: str) -> torch.Tensor:
    raise NotDifferentiableError(f"topo.{operation} has no gradient: {why}")


@not_differentiable.register_fake  # type: ignore[untyped-decorator]
def _fake(g: torch.Tensor, operation: str, why: str) -> torch.Tensor:
    return g.new_empty(g.shape)


mark_side_effects(torch.ops.topo.not_differentiable.default)


def reduce_op_backward(operation: str, op: str, g: torch.Tensor) -> torch.Tensor:
    """What the backward of a ``max``/``min``/``prod`` reduction returns: an op that raises."""
    why = (
        f"op={op!r} is not differentiable in topo (only 'sum' and 'avg' are); detach the input "
        f"(x.detach()) or reduce with op='sum'/'avg' and build the {op} from it"
    )
    result: torch.Tensor = torch.ops.topo.not_differentiable(g, operation, why)
    return result

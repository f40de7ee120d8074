"""shard_map on DTensors: the placements a spec means on a torch device mesh, checked, and the
local shards in and out without moving a byte (what ``torch.distributed.tensor.experimental.
local_map`` does, with the specs checked).

A spec maps to one placement per torch mesh dimension (named after topo's axes, as
``ctx.torch_mesh()`` names them): ``Shard(d)`` for an axis that splits tensor dimension ``d``,
``Replicate()`` for an axis the spec leaves out. A tensor dimension split over several axes
must list them in the torch mesh's dimension order (DTensor's order for one dimension sharded
twice). An input's gradient is ``Partial`` along the axes its spec leaves out: each rank's
block holds its share of the sum.

Example::

    placements(P("dp", None), ("dp", "tp"), {})   # (Shard(dim=0), Replicate())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from topo.errors import TopoTypeError, TopoValueError
from topo.partition_spec import PartitionSpec

__all__ = ["from_local", "is_dtensor", "placements", "to_local"]


def _tensor_module() -> Any:
    try:
        import torch.distributed.tensor as dt  # torch >= 2.5

        if hasattr(dt, "DTensor"):
            return dt
    except ImportError:  # pragma: no cover - torch 2.4
        pass
    import torch.distributed._tensor as dt_old  # torch 2.4

    return dt_old


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (without importing DTensor for plain tensors).

    Example::

        is_dtensor(torch.ones(2))   # False
    """
    return type(x).__name__ == "DTensor" and isinstance(x, torch.Tensor)


def _partial() -> Any:
    dt = _tensor_module()
    if hasattr(dt, "Partial"):
        return dt.Partial()
    from torch.distributed._tensor.placement_types import (  # type: ignore[attr-defined]
        _Partial,  # torch 2.4
    )

    return _Partial()


def placements(
    spec: PartitionSpec, dims: Sequence[str], derived: Mapping[str, tuple[str, ...]]
) -> tuple[Any, ...]:
    """The placement of each torch mesh dimension (named ``dims``) that ``spec`` means.

    Example::

        placements(P(None, "tp"), ("dp", "tp"), {})   # (Replicate(), Shard(dim=1))
    """
    dt = _tensor_module()
    where: dict[str, int] = {}
    for dim in range(len(spec)):
        axes = [a for name in spec.dim_axes(dim) for a in derived.get(name, (name,))]
        positions = []
        for axis in axes:
            if axis not in dims:
                raise TopoValueError(
                    f"shard_map {spec!r} names axis {axis!r}, which the DTensors' device mesh "
                    f"(dims {tuple(dims)}) does not have; use ctx.torch_mesh() for the DTensors"
                )
            positions.append(dims.index(axis))
            where[axis] = dim
        if positions != sorted(positions):
            raise TopoValueError(
                f"shard_map {spec!r} splits dimension {dim} over {tuple(axes)}, but DTensor "
                f"shards one dimension over several mesh dims in mesh order {tuple(dims)}; list "
                f"the axes in that order"
            )
    return tuple(dt.Shard(where[d]) if d in where else dt.Replicate() for d in dims)


def to_local(
    x: torch.Tensor,
    spec: PartitionSpec,
    missing: Sequence[str],
    derived: Mapping[str, tuple[str, ...]],
    where: str,
) -> torch.Tensor:
    """The local shard of DTensor ``x`` after checking that its placements are ``spec``'s;
    its gradient comes back ``Partial`` along ``missing`` (the axes the spec leaves out).

    Example::

        block = to_local(x, P("dp", None), ("tp",), {}, "in_specs[0]")
    """
    if not is_dtensor(x):
        raise TopoTypeError(
            f"shard_map {where} requires a DTensor like the other arguments (all or none), but "
            f"got a plain {type(x).__name__}; distribute it with ctx.torch_mesh()"
        )
    mesh = x.device_mesh  # type: ignore[attr-defined]
    dims = tuple(mesh.mesh_dim_names or ())
    wanted = placements(spec, dims, derived)
    got = tuple(x.placements)  # type: ignore[attr-defined]
    if got != wanted:
        raise TopoValueError(
            f"shard_map {where} {spec!r} requires a DTensor placed {wanted} on mesh dims "
            f"{dims}, but got {got}; redistribute it first (x.redistribute(mesh, {list(wanted)}))"
        )
    grads = tuple(_partial() if d in missing else p for d, p in zip(dims, wanted, strict=True))
    local: torch.Tensor = x.to_local(grad_placements=grads)  # type: ignore[attr-defined]
    return local


def from_local(
    y: torch.Tensor,
    spec: PartitionSpec,
    mesh: Any,
    derived: Mapping[str, tuple[str, ...]],
    where: str,
) -> torch.Tensor:
    """The DTensor on ``mesh`` whose local shard is ``y``, placed as ``spec`` says.

    Example::

        out = from_local(y_block, P("dp", "tp"), torch_mesh, {}, "out_specs")
    """
    dims = tuple(mesh.mesh_dim_names or ())
    try:
        placed = placements(spec, dims, derived)
    except TopoValueError as error:
        raise TopoValueError(f"{where}: {error}") from None
    dt = _tensor_module()
    result: torch.Tensor = dt.DTensor.from_local(y, mesh, placed, run_check=False)
    return result

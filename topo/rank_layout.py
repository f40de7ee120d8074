"""From a nested list of global ranks (torch's ``DeviceMesh.mesh.tolist()``) to topo's axes.

Pure rank math, no torch: which order of the named dimensions makes the layout row-major
(``rank = sum(coord * stride)``, the last axis fastest), or an error saying why none does.

Example::

    >>> axes_of_rank_layout([[0, 2], [1, 3]], ("dp", "tp"), "from_torch")
    ([2, 2], ['tp', 'dp'])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from topo.errors import TopoTypeError, TopoValueError

__all__ = ["axes_of_rank_layout", "axes_of_torch_mesh"]


def axes_of_torch_mesh(torch_mesh: Any) -> tuple[list[int], list[str]]:
    """The sizes and names, outermost first, of the topo mesh equal to a torch
    ``DeviceMesh`` (duck-typed: reads ``mesh.tolist()`` and ``mesh_dim_names``).

    Example::

        sizes, names = axes_of_torch_mesh(init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp")))
    """
    try:
        layout = torch_mesh.mesh.tolist()
    except AttributeError:
        raise TopoTypeError(
            f"DeviceMesh.from_torch requires a torch.distributed.device_mesh.DeviceMesh, "
            f"but got {type(torch_mesh).__name__}"
        ) from None
    names = getattr(torch_mesh, "mesh_dim_names", None)
    return axes_of_rank_layout(layout, names, "DeviceMesh.from_torch")


def axes_of_rank_layout(
    layout: Any, names: Sequence[str] | None, what: str
) -> tuple[list[int], list[str]]:
    """The sizes and names, outermost first, of the topo mesh whose row-major layout is
    ``layout`` (a nested list of global ranks whose dimensions are named ``names``).

    Example::

        >>> axes_of_rank_layout([[0, 1], [2, 3]], ("dp", "tp"), "from_torch")
        ([2, 2], ['dp', 'tp'])
    """
    sizes: list[int] = []
    level = layout
    while isinstance(level, list):
        sizes.append(len(level))
        level = level[0] if level else None
    if not names or len(names) != len(sizes):
        raise TopoValueError(
            f"{what} requires a torch mesh with mesh_dim_names (topo axes "
            f"have names), but got mesh_dim_names={names!r} for a mesh of shape "
            f"{tuple(sizes)}; create it with mesh_dim_names=(...)"
        )
    flat: list[int] = layout
    for _ in sizes[1:]:
        flat = [r for row in flat for r in row]  # type: ignore[attr-defined]
    if sorted(flat) != list(range(len(flat))):
        raise TopoValueError(
            f"{what} requires a torch mesh over global ranks 0..{len(flat) - 1}"
            f", but {tuple(names)} holds ranks {sorted(flat)[:8]}{'...' if len(flat) > 8 else ''}"
            f"; a topo mesh spans its whole world: pass the root mesh, not a slice of it"
        )
    natural = [math.prod(sizes[d + 1 :]) for d in range(len(sizes))]
    strides = [
        flat[natural[d]] if sizes[d] > 1 else 0 for d in range(len(sizes))
    ]  # rank one step along dimension d from the origin (the origin is rank 0 if valid)
    order = sorted(range(len(sizes)), key=lambda d: -strides[d] if sizes[d] > 1 else -natural[d])
    expected = [math.prod(sizes[e] for e in order[k + 1 :]) for k in range(len(order))]
    ok = flat[0] == 0 and all(
        sizes[d] == 1 or strides[d] == expected[k] for k, d in enumerate(order)
    )
    if ok:
        for i, rank in enumerate(flat):
            index = [(i // natural[d]) % sizes[d] for d in range(len(sizes))]
            if rank != sum(index[d] * strides[d] for d in range(len(sizes))):
                ok = False
                break
    if not ok:
        raise TopoValueError(
            f"{what} requires a layout topo can express: ranks row-major over "
            f"some order of the axes (rank = sum of coord * stride, the last axis fastest), "
            f"but the torch mesh {tuple(names)} is {layout}, which no order of its axes gives"
        )
    return [sizes[d] for d in order], [names[d] for d in order]

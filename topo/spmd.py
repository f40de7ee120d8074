"""``topo.shard_map``: write the per-rank program with collectives by axis name, call it on
global tensors — ``jax.shard_map`` for torch tensors.

``shard_map(fn, in_specs=..., out_specs=...)`` returns a function of *global* tensors (the same
on every rank). Each rank cuts its block out of every input as its :class:`~topo.P` says, runs
``fn`` on the blocks — collectives, ``topo.axis_index`` and ``topo.axis_size`` by name inside —
and the output blocks are put together as ``out_specs`` says into the global result, on every
rank. A mesh axis an out spec leaves out means the output is the same along it (checked with
``check=True``, JAX's ``check_vma``: a :class:`~topo.CollectiveMismatchError` names the axis
and the ranks that differ). Called with DTensors (on ``ctx.torch_mesh()``), nothing moves: the
local shards go in, DTensors come out (``local_map``'s job, with the specs checked).

Gradients are the unsharded function's: an input's gradient is summed over the axes its spec
leaves out and gathered over the ones it names, and an output left out of an axis passes each
rank ``1/size`` of its cotangent (the blocks are copies of one value), so topo's collectives
inside — whose backward is their adjoint — give exactly the derivative of the global function.

Example::

    def matmul(x, w):                       # x: (B/dp, H), w: (H, F/tp) on each rank
        return x @ w

    f = topo.shard_map(matmul, in_specs=(P("dp", None), P(None, "tp")), out_specs=P("dp", "tp"))
    with DeviceMesh(dp=2, tp=2).activate():
        y = f(x, w)                         # == x @ w, on every rank
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from topo.active import current, find_context
from topo.autograd import copy_to, gather_from, scatter_to
from topo.collectives import all_gather, all_reduce, axis_index, axis_size
from topo.errors import CollectiveMismatchError, TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh
from topo.partition_spec import PartitionSpec
from topo.spmd_dtensor import from_local, is_dtensor, to_local

__all__ = ["shard_map"]

Specs = Any  # a PartitionSpec, None, or a tuple / list / dict of them (a prefix of the args)


def shard_map(
    fn: Callable[..., Any],
    *,
    in_specs: Specs,
    out_specs: Specs,
    mesh: DeviceMesh | None = None,
    check: bool = True,
) -> Callable[..., Any]:
    """``fn`` as a function of global tensors: each rank runs it on its blocks (see the module
    docstring). ``in_specs`` is a prefix of the arguments (one :class:`~topo.P` for all, or a
    tuple with one per argument, nested like the arguments), ``out_specs`` a prefix of the
    result. ``mesh`` (default: the innermost active one) must be active when the function is
    called. ``check=True`` verifies that every output is the same along the axes its spec
    leaves out (per such output: a small all-gather of its shape, an all-gather of its
    blocks and a one-element all-reduce over the mesh; skipped inside ``torch.compile``).

    Example::

        total = topo.shard_map(lambda x: topo.all_reduce(x.sum(0), "dp"),
                               in_specs=P("dp"), out_specs=P())
        with DeviceMesh(dp=4).activate():
            total(torch.ones(8, 3))          # tensor([8., 8., 8.]) on every rank
    """
    if not callable(fn):
        raise TopoTypeError(f"shard_map requires a callable fn, but got {type(fn).__name__}")
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(
            f"shard_map mesh requires a topo.DeviceMesh (or None: the active one), but got "
            f"{type(mesh).__name__}"
        )
    if not isinstance(check, bool):
        raise TopoTypeError(f"shard_map check requires a bool, but got {type(check).__name__}")

    @functools.wraps(fn)
    def mapped(*args: Any) -> Any:
        axes, sizes, derived = _mesh_shape(mesh)
        m = _Mesh(dict(zip(axes, sizes, strict=True)), dict(derived), _torch_mesh_of(args))
        if m.torch_mesh is not None:
            _check_torch_mesh(m)
        blocks = _map(in_specs, args, "in_specs", lambda x, s, p: _block(x, s, p, m))
        out = fn(*blocks)
        return _map(out_specs, out, "out_specs", lambda y, s, p: _whole(y, s, p, m, check))

    return mapped


class _Mesh:
    """What one call needs of the mesh: every axis name (derived ones too) with its size, the
    derived axes, and the torch mesh of DTensor arguments (None for plain tensors)."""

    def __init__(
        self, shape: dict[str, int], derived: dict[str, tuple[str, ...]], torch_mesh: Any
    ) -> None:
        self.shape, self.derived, self.torch_mesh = shape, derived, torch_mesh


def _check_torch_mesh(m: _Mesh) -> None:
    """The DTensors' device mesh must have every axis of the mesh as a dimension: an axis it
    lacks would hold copies that no ``Partial`` gradient sums (and no placement describes)."""
    axes = tuple(a for a in m.shape if a not in m.derived)
    dims = tuple(m.torch_mesh.mesh_dim_names or ())
    if dims != axes:
        raise TopoValueError(
            f"shard_map on DTensors requires their device mesh to have the mesh's axes "
            f"{axes} as its dims, but got dims {dims}; distribute them on ctx.torch_mesh() "
            f"(every axis; Replicate() along the axes they do not split)"
        )


def _torch_mesh_of(args: Any) -> Any:
    """The device mesh of the first DTensor among the arguments, or None."""
    found: list[Any] = []
    _over_leaves(args, lambda x, _: found.append(x) if is_dtensor(x) else None, "")
    return found[0].device_mesh if found else None


def _mesh_shape(
    mesh: DeviceMesh | None,
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """The axes and sizes of the mesh shard_map runs over, from the active contexts (a
    constant for torch.compile, like the collectives' group lookups)."""
    if mesh is None:
        ctx = current()
    else:
        ctx = find_context(mesh.axis_names, "shard_map")[0]
        if ctx.mesh != mesh and not _same_axes(ctx.mesh, mesh):
            raise TopoValueError(
                f"shard_map mesh={mesh!r} requires that mesh to be active, but the innermost "
                f"active mesh with its axes is {ctx.mesh!r}; call the function inside "
                f"`with mesh.activate():` (or ctx.view(mesh))"
            )
    m = ctx.mesh
    names = (*m.axis_names, *m.derived_axes)
    return names, tuple(m.axis_size(n) for n in names), tuple(m.derived_axes.items())


_mesh_shape._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _same_axes(a: DeviceMesh, b: DeviceMesh) -> bool:
    return a.axis_names == b.axis_names and a.axis_sizes == b.axis_sizes


def _map(specs: Specs, tree: Any, what: str, leaf: Callable[[Any, Any, str], Any]) -> Any:
    """Apply ``leaf(value, spec, path)`` to every tensor of ``tree`` under ``specs``, a
    prefix of it (a spec applies to every tensor below it); the result has ``tree``'s shape."""

    def walk(spec: Specs, node: Any, path: str) -> Any:
        if spec is None or isinstance(spec, PartitionSpec):
            every = what == "out_specs"  # an output must be tensors; an input may hold values
            return _over_leaves(
                node, lambda x, p: leaf(x, spec or PartitionSpec(), p), path, every
            )
        if isinstance(spec, (tuple, list)):
            if not isinstance(node, (tuple, list)) or len(node) != len(spec):
                raise TopoValueError(
                    f"shard_map {what}{path} requires the structure of the values it describes, "
                    f"but got {len(spec)} specs for {_describe(node)}; give one spec per item "
                    f"(or one P for all)"
                )
            items = [
                walk(s, n, f"{path}[{i}]") for i, (s, n) in enumerate(zip(spec, node, strict=True))
            ]
            return _rebuild(node, items)
        if isinstance(spec, dict):
            if not isinstance(node, dict) or set(node) != set(spec):
                raise TopoValueError(
                    f"shard_map {what}{path} requires the keys of the values it describes, but "
                    f"got specs for {sorted(spec)} and {_describe(node)}"
                )
            return {k: walk(spec[k], v, f"{path}[{k!r}]") for k, v in node.items()}
        raise TopoTypeError(
            f"shard_map {what}{path} requires a topo.P, None, or a tuple/list/dict of them, but "
            f"got {type(spec).__name__} {spec!r}"
        )

    return walk(specs, tree, "")


def _over_leaves(
    node: Any, leaf: Callable[[Any, str], Any], path: str, every: bool = False
) -> Any:
    """``leaf`` on every tensor of ``node`` (on every leaf with ``every``)."""
    if isinstance(node, (tuple, list)):
        items = [_over_leaves(n, leaf, f"{path}[{i}]", every) for i, n in enumerate(node)]
        return _rebuild(node, items)
    if isinstance(node, dict):
        return {k: _over_leaves(v, leaf, f"{path}[{k!r}]", every) for k, v in node.items()}
    if isinstance(node, torch.Tensor) or every:
        return leaf(node, path)
    return node  # an argument that is a Python value reaches every rank as it is


def _rebuild(node: Sequence[Any], items: list[Any]) -> Any:
    if isinstance(node, list):
        return items
    if hasattr(node, "_fields"):  # a namedtuple
        return type(node)(*items)
    return tuple(items)


def _describe(node: Any) -> str:
    if isinstance(node, (tuple, list)):
        return f"a {type(node).__name__} of {len(node)}"
    if isinstance(node, dict):
        return f"a dict with keys {sorted(node)}"
    return f"a {type(node).__name__}"


def _layout(
    x: torch.Tensor, spec: PartitionSpec, path: str, m: _Mesh, what: str
) -> list[tuple[int, tuple[str, ...]]]:
    """``(dim, axes)`` for each split dimension of ``x``, checked against the mesh."""
    shape = m.shape
    if len(spec) > x.dim():
        raise TopoValueError(
            f"shard_map {what}{path} {spec!r} requires a tensor of at least {len(spec)} "
            f"dimensions, but got shape {tuple(x.shape)}"
        )
    for name in spec.axes:
        if name not in shape:
            raise TopoValueError(
                f"shard_map {what}{path} {spec!r} names axis {name!r}, which the mesh does not "
                f"have; valid axes are {', '.join(map(repr, shape))}"
            )
    expanded = [a for name in spec.axes for a in m.derived.get(name, (name,))]
    twice = sorted({a for a in expanded if expanded.count(a) > 1})
    if twice:
        through = ", ".join(f"{d}={m.derived[d]}" for d in spec.axes if d in m.derived)
        raise TopoValueError(
            f"shard_map {what}{path} {spec!r} requires each mesh axis at most once, but axis "
            f"{twice[0]!r} is named twice (through the derived axes {through}); name it once"
        )
    layout = []
    for dim in range(len(spec)):
        axes = spec.dim_axes(dim)
        if not axes:
            continue
        n = 1
        for a in axes:
            n *= shape[a]
        if what == "in_specs" and x.shape[dim] % n:  # an output is a block: any size
            sizes = " * ".join(f"{a}({shape[a]})" for a in axes)
            raise TopoValueError(
                f"shard_map {what}{path} {spec!r} requires dimension {dim} (size "
                f"{x.shape[dim]}) to split evenly over {sizes} = {n}, but {x.shape[dim]} % {n} "
                f"= {x.shape[dim] % n}; pad it, or use all_gatherv for uneven blocks"
            )
        layout.append((dim, axes))
    return layout


def _left_out(spec: PartitionSpec, m: _Mesh) -> tuple[str, ...]:
    """The mesh axes (not derived ones) a spec leaves out, its derived axes expanded."""
    used: set[str] = set()
    for a in spec.axes:
        used.update(m.derived.get(a, (a,)))
    return tuple(a for a in m.shape if a not in m.derived and a not in used)


def _block(x: torch.Tensor, spec: PartitionSpec, path: str, m: _Mesh) -> torch.Tensor:
    """This rank's block of the global ``x`` (or the local shard of a DTensor)."""
    layout = _layout(x, spec, path, m, "in_specs")
    missing = _left_out(spec, m)
    if m.torch_mesh is not None:
        return to_local(x, spec, missing, m.derived, f"in_specs{path}")
    if not x.requires_grad and not torch.compiler.is_compiling():
        for dim, axes in layout:  # a view of this rank's block: nothing copied
            for axis in axes:
                n = x.shape[dim] // axis_size(axis)
                x = x.narrow(dim, axis_index(axis) * n, n)
        return x
    if missing:
        x = copy_to(x, missing)  # the gradient is summed over the axes the block is copied to
    for dim, axes in layout:
        for axis in axes:  # major first: each split cuts the previous block
            x = scatter_to(x, axis, dim=dim)
    return x


def _whole(y: Any, spec: PartitionSpec, path: str, m: _Mesh, check: bool) -> Any:
    """The global value of the output blocks ``y`` (a DTensor when the inputs were)."""
    if not isinstance(y, torch.Tensor):
        raise TopoTypeError(
            f"shard_map out_specs{path} {spec!r} requires fn to return a tensor there, but it "
            f"returned {type(y).__name__}"
        )
    layout = _layout(y, spec, path, m, "out_specs")
    missing = _left_out(spec, m)
    if check and missing and not torch.compiler.is_compiling():
        _check_invariant(y, missing, spec, path)
    if missing and y.requires_grad:
        y = _Copies.apply(y, _product(m.shape, missing))  # type: ignore[no-untyped-call]
    if m.torch_mesh is not None:
        return from_local(y, spec, m.torch_mesh, m.derived, f"out_specs{path}")
    plain = not y.requires_grad and not torch.compiler.is_compiling()
    for dim, axes in layout:
        for axis in reversed(axes):  # minor first: each gather builds the next-larger block
            y = all_gather(y, axis, dim=dim) if plain else gather_from(y, axis, dim=dim)
    return y


def _product(shape: dict[str, int], axes: Sequence[str]) -> int:
    n = 1
    for a in axes:
        n *= shape[a]
    return n


class _Copies(torch.autograd.Function):
    """Identity forward; the backward passes ``1/n`` of the cotangent: the ``n`` ranks along the
    left-out axes hold copies of one output value, each carries its share of its gradient."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return g / ctx.n, None


def _check_invariant(
    y: torch.Tensor, axes: tuple[str, ...], spec: PartitionSpec, path: str
) -> None:
    """Raise on every rank if ``y`` differs along ``axes`` on any group: the rank whose block
    differs from its group's first rank's is named (the highest such rank of the mesh). The
    blocks' shapes and dtypes are compared first (one small all-gather), so blocks of
    different shapes are named too; NaNs in the same places are the same."""
    ctx = find_context(axes, "shard_map")[0]
    group = ctx.group(axes)
    signature = zlib.crc32(repr((tuple(y.shape), str(y.dtype))).encode())
    mine = torch.tensor([signature], dtype=torch.int64, device=y.device)
    signatures = all_gather(mine, axes).tolist()
    differs = [i for i in range(1, len(group)) if signatures[i] != signatures[0]]
    shapes_differ = bool(differs)
    if not shapes_differ:
        blocks = all_gather(y.detach().unsqueeze(0), axes)  # (n, *y.shape)
        differs = [i for i in range(1, len(group)) if not _same(blocks[i], blocks[0])]
    # every rank learns the worst (rank, kind) of the mesh: 2 * rank + 1 when shapes differ
    code = 2 * group[differs[-1]] + shapes_differ if differs else -1
    worst = all_reduce(
        torch.tensor([code], dtype=torch.int64, device=y.device), ctx.mesh.axis_names, op="max"
    )
    found = int(worst.item())
    if found < 0:
        return
    rank, what = found // 2, "shape or dtype" if found % 2 else "output"
    first = ctx.mesh.first(axes, rank)
    axis = axes[0] if len(axes) == 1 else axes
    raise CollectiveMismatchError(
        f"shard_map out_specs{path} {spec!r} leaves out axis {axis!r}, which requires the "
        f"output to be the same on every rank along it, but rank {rank}'s {what} differs from "
        f"rank {first}'s (their group along {axis!r}: {ctx.mesh.group(axes, rank)}); name the "
        f"axis in the out spec to concatenate the blocks, reduce over it first (e.g. "
        f"topo.all_reduce(y, {axis!r})), or pass check=False"
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a replicated NaN does not vary)."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())

"""The mesh spec: named axes over a row-major grid of ranks, and pure rank math.

Nothing here imports torch or does I/O: every method is arithmetic on the axis sizes, costing
time proportional to its answer (one rank's coordinates cost O(#axes), one group costs
O(group size), all groups of an axis cost O(world size)).

Layout: axes are listed outermost first and the last axis varies fastest, so
``rank = sum(coord[i] * prod(size[j] for j > i))`` — the same as NumPy's
``arange(size).reshape(shape)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from topo._checks import as_axis_name, as_int
from topo.errors import TopoTypeError, TopoValueError
from topo.mesh_views import MeshViews, rebuild

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from datetime import timedelta

    from topo.context import MeshContext
    from topo.placement import Placement as Placement
    from topo.placement import parse_mesh as parse_mesh
    from topo.world import World

__all__ = ["Axis", "DeviceMesh"]

#: The most ranks a mesh may have: gloo and NCCL number ranks with 32-bit signed ints.
MAX_RANKS = 2**31 - 1

#: An axis argument: one axis name, or a tuple of names that vary together as one flattened axis.
#: Example: ``topo.all_gather(x, axis=("dp", "tp"))`` (``axis: topo.Axis``).
Axis = str | Sequence[str]


def _format_sizes(names: Sequence[str], sizes: Sequence[int]) -> str:
    return " * ".join(f"{n}({s})" for n, s in zip(names, sizes, strict=True))


@attrs.frozen(init=False, repr=False)
class DeviceMesh(MeshViews):
    """An immutable grid of ranks with named axes, listed outermost first.

    The last axis varies fastest: ``DeviceMesh(dp=2, pp=2, tp=2)`` lays ranks out as NumPy's
    ``arange(8).reshape(2, 2, 2)``, so tp groups are contiguous and pp groups strided. The
    value is hashable and picklable, and every method is pure rank math: no process, no torch.

    Example::

        >>> mesh = DeviceMesh(dp=2, pp=2, tp=2)
        >>> mesh.group("tp", 5)
        (4, 5)
        >>> mesh.groups("pp")
        ((0, 2), (1, 3), (4, 6), (5, 7))
        >>> mesh.coords(6)
        {'dp': 1, 'pp': 1, 'tp': 0}
    """

    axis_names: tuple[str, ...]
    """Axis names, outermost first."""
    axis_sizes: tuple[int, ...]
    """Axis sizes, in the order of :attr:`axis_names`."""
    _strides: tuple[int, ...] = attrs.field(eq=False, hash=False)
    _positions: Mapping[str, int] = attrs.field(eq=False, hash=False)
    size: int = attrs.field(eq=False, hash=False)
    """Number of ranks: the product of the axis sizes."""
    _derived: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __init__(self, /, **axes: int) -> None:
        if not axes:
            raise TopoValueError(
                "DeviceMesh requires at least one axis, like DeviceMesh(dp=2, tp=4), but got none"
            )
        self._setup(tuple(axes), tuple(axes.values()))

    def _setup(
        self,
        names: tuple[str, ...],
        sizes: tuple[Any, ...],
        derived: tuple[tuple[str, tuple[str, ...]], ...] = (),
    ) -> None:
        for name in names:
            as_axis_name(name, "DeviceMesh axis name")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise TopoValueError(
                    f"DeviceMesh requires distinct axis names, but got {name!r} twice in {names}"
                )
            seen.add(name)
        checked = []
        for name, size in zip(names, sizes, strict=True):
            value = as_int(size, f"DeviceMesh axis {name!r} size")
            if value < 1:
                raise TopoValueError(
                    f"DeviceMesh axis {name!r} requires a positive size, but got {value}; "
                    f"use 1 for an axis that is not split"
                )
            checked.append(value)
        strides = [1] * len(checked)
        for i in range(len(checked) - 2, -1, -1):
            strides[i] = strides[i + 1] * checked[i + 1]
        if strides[0] * checked[0] > MAX_RANKS:
            raise TopoValueError(
                f"DeviceMesh requires at most {MAX_RANKS} ranks (gloo and NCCL number ranks "
                f"with 32-bit ints), but got {_format_sizes(names, checked)} = "
                f"{strides[0] * checked[0]}; use smaller axis sizes"
            )
        self.__attrs_init__(  # type: ignore[attr-defined]
            names,
            tuple(checked),
            tuple(strides),
            MappingProxyType({n: i for i, n in enumerate(names)}),
            strides[0] * checked[0],
            derived,
        )

    @classmethod
    def _make(
        cls, sizes: Sequence[int], names: Sequence[str], derived: Mapping[str, tuple[str, ...]]
    ) -> DeviceMesh:
        """A mesh with derived axes (already checked: see ``MeshViews.with_axes``)."""
        mesh = cls.__new__(cls)
        mesh._setup(tuple(names), tuple(sizes), tuple(sorted(derived.items())))
        return mesh

    @classmethod
    def from_shape(cls, shape: Sequence[int], names: Sequence[str]) -> DeviceMesh:
        """Build a mesh from a shape and axis names of equal length, outermost first.

        Example::

            >>> DeviceMesh.from_shape((2, 4), ("dp", "tp"))
            DeviceMesh(dp=2, tp=4)
        """
        if isinstance(names, str):
            raise TopoTypeError(
                f"DeviceMesh.from_shape names requires a sequence of axis names, but got the "
                f"str {names!r}; pass ({names!r},) for a single axis"
            )
        shape_t, names_t = tuple(shape), tuple(names)
        if len(shape_t) != len(names_t):
            raise TopoValueError(
                f"DeviceMesh.from_shape requires one name per dimension, but got shape {shape_t} "
                f"({len(shape_t)} dims) and names {names_t} ({len(names_t)} names)"
            )
        if not names_t:
            raise TopoValueError("DeviceMesh.from_shape requires at least one axis, but got none")
        mesh = cls.__new__(cls)
        mesh._setup(names_t, shape_t)
        return mesh

    # ------------------------------------------------------------------ views

    @property
    def shape(self) -> Mapping[str, int]:
        """Read-only ordered mapping of axis name to size, outermost first.

        Example::

            >>> dict(DeviceMesh(dp=2, tp=4).shape)
            {'dp': 2, 'tp': 4}
        """
        return MappingProxyType(dict(zip(self.axis_names, self.axis_sizes, strict=True)))

    @property
    def derived_axes(self) -> Mapping[str, tuple[str, ...]]:
        """Read-only mapping of each derived axis (:meth:`with_axes`) to the axes it stands for.

        Example::

            >>> dict(DeviceMesh(dp=2, tp=2).with_axes(ep=("dp", "tp")).derived_axes)
            {'ep': ('dp', 'tp')}
        """
        return MappingProxyType(dict(self._derived))

    @property
    def ndim(self) -> int:
        """Number of axes.

        Example::

            >>> DeviceMesh(dp=2, tp=4).ndim
            2
        """
        return len(self.axis_names)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes, strict=True))
        derived = ", ".join(f"{a}={over!r}" for a, over in self._derived)
        return f"DeviceMesh({parts})" + (f".with_axes({derived})" if derived else "")

    def __str__(self) -> str:
        return _format_sizes(self.axis_names, self.axis_sizes)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._derived:
            return (rebuild, (self.axis_sizes, self.axis_names, self._derived))
        return (DeviceMesh.from_shape, (self.axis_sizes, self.axis_names))

    # ------------------------------------------------------------ validation

    def _axis_position(self, axis: object) -> int:
        if not isinstance(axis, str):
            raise TopoTypeError(
                f"axis requires a str name (one of {self._valid_axes()}), "
                f"but got {type(axis).__name__} {axis!r}"
            )
        try:
            return self._positions[axis]
        except KeyError:
            if axis in self.derived_axes:
                raise TopoValueError(
                    f"this requires one axis of mesh {self}, but {axis!r} is a derived axis "
                    f"(= {self.derived_axes[axis]}); name one of {self._valid_axes(False)}"
                ) from None
            raise TopoValueError(
                f"unknown axis {axis!r}: mesh {self} has axes {self._valid_axes()}"
            ) from None

    def _valid_axes(self, derived: bool = True) -> str:
        names = [*self.axis_names, *(a for a, _ in self._derived)] if derived else self.axis_names
        return ", ".join(repr(n) for n in names)

    def normalize_axis(self, axis: Axis) -> tuple[str, ...]:
        """Validate ``axis`` and return its names as a tuple in mesh order (outermost first).

        A tuple of names is one flattened axis; the order of the names in it does not matter.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).normalize_axis(("tp", "dp"))
            ('dp', 'tp')
        """
        return tuple(self.axis_names[p] for p in self._positions_of(axis))

    def _positions_of(self, axis: Axis) -> tuple[int, ...]:
        if isinstance(axis, str):
            if self._derived and axis not in self._positions:
                over = self.derived_axes.get(axis)
                if over is not None:
                    return tuple(sorted(self._positions[a] for a in over))
            return (self._axis_position(axis),)
        if not isinstance(axis, (tuple, list)):
            raise TopoTypeError(
                f"axis requires a name or a tuple of names from {self._valid_axes()}, "
                f"but got {type(axis).__name__} {axis!r}"
            )
        if not axis:
            raise TopoValueError(
                f"axis requires at least one name from {self._valid_axes()}, but got {axis!r}"
            )
        if self._derived:
            positions = [p for a in axis for p in self._positions_of(a)]
        else:
            positions = [self._axis_position(a) for a in axis]
        if len(set(positions)) != len(positions):
            raise TopoValueError(f"axis requires distinct names, but got {tuple(axis)!r}")
        return tuple(sorted(positions))

    def _check_rank(self, rank: object, what: str = "rank") -> int:
        value = as_int(rank, what)
        if not 0 <= value < self.size:
            raise TopoValueError(
                f"{what} requires 0 <= {what} < {self.size} for mesh {self} = {self.size}, "
                f"but got {value}"
            )
        return value

    # ------------------------------------------------------------- rank math

    def stride(self, axis: str) -> int:
        """How far apart in rank two neighbours along ``axis`` are.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).stride("pp")
            2
        """
        return self._strides[self._axis_position(axis)]

    def axis_size(self, axis: Axis) -> int:
        """Size of ``axis``; for a tuple, the product of its sizes.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).axis_size(("dp", "tp"))
            4
        """
        return math.prod(self.axis_sizes[p] for p in self._positions_of(axis))

    def coords(self, rank: int) -> dict[str, int]:
        """The coordinates of ``rank``: axis name → index along that axis.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).coords(5)
            {'dp': 1, 'pp': 0, 'tp': 1}
        """
        r = self._check_rank(rank)
        return {
            n: (r // st) % sz
            for n, st, sz in zip(self.axis_names, self._strides, self.axis_sizes, strict=True)
        }

    def rank_of(self, /, **coords: int) -> int:
        """The rank at ``coords`` (every axis named once); the inverse of :meth:`coords`.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).rank_of(dp=1, pp=0, tp=1)
            5
        """
        unknown = [a for a in coords if a not in self._positions]
        if unknown:
            raise TopoValueError(
                f"rank_of got unknown axis {unknown[0]!r}: mesh {self} has axes "
                f"{self._valid_axes()}"
            )
        missing = [a for a in self.axis_names if a not in coords]
        if missing:
            raise TopoValueError(
                f"rank_of requires a coordinate for every axis ({self._valid_axes()}), "
                f"but got none for {', '.join(repr(m) for m in missing)}"
            )
        rank = 0
        for name, stride, size in zip(self.axis_names, self._strides, self.axis_sizes, strict=True):
            index = as_int(coords[name], f"rank_of coordinate {name!r}")
            if not 0 <= index < size:
                raise TopoValueError(
                    f"rank_of coordinate {name!r} requires 0 <= {name} < {size}, but got {index}"
                )
            rank += index * stride
        return rank

    def axis_index(self, axis: Axis, rank: int) -> int:
        """Index of ``rank`` within its group along ``axis``.

        For a tuple the index is row-major over those axes in mesh order, last axis fastest
        (as ``jax.lax.axis_index``), which is also the rank's position in :meth:`group`.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).axis_index(("dp", "tp"), 5)
            3
        """
        positions = self._positions_of(axis)
        r = self._check_rank(rank)
        index = 0
        for p in positions:
            index = index * self.axis_sizes[p] + (r // self._strides[p]) % self.axis_sizes[p]
        return index

    def _rank_at(self, rank: int, positions: tuple[int, ...], index: int) -> int:
        """``rank`` moved to flat ``index`` along the axes at ``positions`` (others fixed)."""
        for p in reversed(positions):
            size, stride = self.axis_sizes[p], self._strides[p]
            rank += ((index % size) - (rank // stride) % size) * stride
            index //= size
        return rank

    def group(self, axis: Axis, rank: int) -> tuple[int, ...]:
        """The global ranks in ``rank``'s group along ``axis``, in axis-index order.

        A tuple of axes is one flattened axis: those axes vary (row-major, mesh order), the
        others stay at ``rank``'s coordinates.

        Example::

            >>> mesh = DeviceMesh(dp=2, pp=2, tp=2)
            >>> mesh.group("pp", 5)
            (5, 7)
            >>> mesh.group(("dp", "tp"), 2)
            (2, 3, 6, 7)
        """
        positions = self._positions_of(axis)
        r = self._check_rank(rank)
        base = r - sum(
            ((r // self._strides[p]) % self.axis_sizes[p]) * self._strides[p] for p in positions
        )
        return tuple(self._offsets(positions, base))

    def _offsets(self, positions: tuple[int, ...], base: int) -> list[int]:
        ranks = [base]
        for p in positions:
            stride, size = self._strides[p], self.axis_sizes[p]
            ranks = [r + k * stride for r in ranks for k in range(size)]
        return ranks

    def iter_groups(self, axis: Axis) -> Iterator[tuple[int, ...]]:
        """Lazily yield the groups of :meth:`groups`, in the same order.

        Example::

            >>> next(DeviceMesh(dp=2, tp=4).iter_groups("dp"))
            (0, 4)
        """
        positions = self._positions_of(axis)
        return self._iter_groups(positions)

    def _iter_groups(self, positions: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        offsets = self._offsets(positions, 0)
        steps = [
            range(0, self.axis_sizes[p] * self._strides[p], self._strides[p])
            for p in range(self.ndim)
            if p not in positions
        ]
        for parts in itertools.product(*steps):
            base = sum(parts)
            yield tuple(base + o for o in offsets)

    def groups(self, axis: Axis) -> tuple[tuple[int, ...], ...]:
        """All groups along ``axis``: a partition of the ranks.

        Groups are ordered by their first (smallest) rank; ranks inside a group are in
        axis-index order (:meth:`axis_index`), so ``groups(axis)[i][j]`` has index ``j``.

        Example::

            >>> DeviceMesh(pp=4, tp=2).groups("tp")
            ((0, 1), (2, 3), (4, 5), (6, 7))
            >>> DeviceMesh(pp=4, tp=2).groups("pp")
            ((0, 2, 4, 6), (1, 3, 5, 7))
        """
        return tuple(self.iter_groups(axis))

    def num_groups(self, axis: Axis) -> int:
        """How many groups :meth:`groups` has: ``size // axis_size(axis)``.

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).num_groups("tp")
            4
        """
        return self.size // self.axis_size(axis)

    def group_index(self, axis: Axis, rank: int) -> int:
        """Position of ``rank``'s group in :meth:`groups` (its coordinates on the other axes).

        Example::

            >>> DeviceMesh(dp=2, pp=2, tp=2).group_index("tp", 5)
            2
        """
        positions = self._positions_of(axis)
        others = tuple(p for p in range(self.ndim) if p not in positions)
        r = self._check_rank(rank)
        index = 0
        for p in others:
            index = index * self.axis_sizes[p] + (r // self._strides[p]) % self.axis_sizes[p]
        return index

    def neighbor(self, axis: Axis, rank: int, offset: int = 1, wrap: bool = True) -> int | None:
        """The global rank ``offset`` steps from ``rank`` along ``axis``.

        With ``wrap=True`` the axis is a ring; with ``wrap=False`` a step past either end
        gives ``None`` (the last pipeline stage has no next stage).

        Example::

            >>> mesh = DeviceMesh(pp=4, tp=2)
            >>> mesh.neighbor("pp", 6)
            0
            >>> mesh.neighbor("pp", 6, wrap=False) is None
            True
            >>> mesh.neighbor("pp", 2, offset=-1)
            0
        """
        positions = self._positions_of(axis)
        r = self._check_rank(rank)
        step = as_int(offset, "offset")
        if not isinstance(wrap, bool):
            raise TopoTypeError(f"wrap requires a bool, but got {type(wrap).__name__} {wrap!r}")
        n = math.prod(self.axis_sizes[p] for p in positions)
        target = self.axis_index(axis, r) + step
        if not wrap and not 0 <= target < n:
            return None
        return self._rank_at(r, positions, target % n)

    def first(self, axis: Axis, rank: int) -> int:
        """The first rank (index 0) of ``rank``'s group along ``axis``.

        Example::

            >>> DeviceMesh(pp=4, tp=2).first("pp", 7)
            1
        """
        return self._rank_at(self._check_rank(rank), self._positions_of(axis), 0)

    def last(self, axis: Axis, rank: int) -> int:
        """The last rank of ``rank``'s group along ``axis``.

        Example::

            >>> DeviceMesh(pp=4, tp=2).last("pp", 1)
            7
        """
        positions = self._positions_of(axis)
        n = math.prod(self.axis_sizes[p] for p in positions)
        return self._rank_at(self._check_rank(rank), positions, n - 1)

    def is_first(self, axis: Axis, rank: int) -> bool:
        """Whether ``rank`` has index 0 along ``axis``.

        Example::

            >>> DeviceMesh(pp=4, tp=2).is_first("pp", 1)
            True
        """
        return self.axis_index(axis, rank) == 0

    def is_last(self, axis: Axis, rank: int) -> bool:
        """Whether ``rank`` has the last index along ``axis``.

        Example::

            >>> DeviceMesh(pp=4, tp=2).is_last("pp", 6)
            True
        """
        return self.axis_index(axis, rank) == self.axis_size(axis) - 1

    # ----------------------------------------------------------- derived meshes

    def placement(self, ranks_per_node: int) -> Placement:
        """Node placement when each node holds ``ranks_per_node`` consecutive ranks.

        Example::

            >>> p = DeviceMesh(dp=2, pp=2, tp=4).placement(ranks_per_node=4)
            >>> p.intra_node_axes, p.inter_node_axes
            (('tp',), ('pp', 'dp'))
        """
        from topo.placement import Placement

        return Placement(self, ranks_per_node)

    # ------------------------------------------------------------------ runtime

    def activate(
        self,
        world: World | None = None,
        *,
        timeout: float | timedelta | None = None,
        **options: Any,
    ) -> AbstractContextManager[MeshContext]:
        """Turn this spec into live communicators for this process: a context manager.

        A one-line delegate to :func:`topo.context.activate`; see there for every option.

        Example::

            with DeviceMesh(dp=2, tp=2).activate():
                y = topo.all_reduce(x, axis="tp")
        """
        from topo.context import activate

        return activate(self, world, timeout=timeout, **options)

    @classmethod
    def from_torch(cls, torch_mesh: Any) -> DeviceMesh:
        """The topo spec equal to a ``torch.distributed.device_mesh.DeviceMesh``: its
        ``mesh_dim_names`` become axis names, ordered so that topo's row-major rank layout gives
        every rank the same coordinates (duck-typed: reads ``mesh.tolist()`` and
        ``mesh_dim_names``; no torch import here).

        Example::

            tm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            DeviceMesh.from_torch(tm)   # DeviceMesh(dp=2, tp=2)
        """
        from topo.rank_layout import axes_of_torch_mesh

        return cls.from_shape(*axes_of_torch_mesh(torch_mesh))


def __getattr__(name: str) -> Any:
    # Placement and parse_mesh live in topo.placement, which imports this module; they stay
    # importable from here, loaded on first use so that either module may be imported first.
    if name in ("Placement", "parse_mesh"):
        import topo.placement

        return getattr(topo.placement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

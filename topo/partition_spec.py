"""``PartitionSpec`` (``topo.P``): how each dimension of a tensor is split over mesh axes.

One entry per tensor dimension, leading dimensions first: ``None`` (not split), an axis name
(split into that axis's size blocks, block ``i`` on index ``i``), or a tuple of axis names
(split over them together, the first name major: ``("dp", "tp")`` gives block
``dp_index * tp_size + tp_index``). Dimensions past the entries are not split, so ``P()`` is a
replicated tensor. As ``jax.sharding.PartitionSpec``. A value: no mesh needed to build one.

Example::

    >>> P("dp", None, ("tp", "sp"))
    P('dp', None, ('tp', 'sp'))
    >>> P("dp").axes
    ('dp',)
"""

from __future__ import annotations

from typing import Any

from topo._checks import as_axis_name
from topo.errors import TopoTypeError, TopoValueError

__all__ = ["P", "PartitionSpec"]

Entry = str | tuple[str, ...] | None


class PartitionSpec(tuple[Entry, ...]):
    """How each dimension of a tensor is split over mesh axes (see the module docstring).

    Example::

        >>> spec = PartitionSpec("dp", None)
        >>> spec[0], len(spec)
        ('dp', 2)
    """

    __slots__ = ()

    def __new__(cls, *entries: Any) -> PartitionSpec:
        checked: list[Entry] = []
        for i, entry in enumerate(entries):
            if entry is None:
                checked.append(None)
            elif isinstance(entry, str):
                checked.append(as_axis_name(entry, f"P entry {i}"))
            elif isinstance(entry, (tuple, list)):
                names = tuple(as_axis_name(a, f"P entry {i}") for a in entry)
                checked.append(names[0] if len(names) == 1 else (names or None))
            else:
                raise TopoTypeError(
                    f"P entry {i} requires None, an axis name or a tuple of axis names, but got "
                    f"{type(entry).__name__} {entry!r}"
                )
        spec = super().__new__(cls, checked)
        seen: set[str] = set()
        for name in spec.axes:
            if name in seen:
                raise TopoValueError(
                    f"P requires each axis at most once, but got {name!r} twice in {spec!r}; a "
                    f"dimension split twice over one axis has no meaning"
                )
            seen.add(name)
        return spec

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis name the spec splits over, in entry order.

        Example::

            >>> P(("dp", "tp"), None, "sp").axes
            ('dp', 'tp', 'sp')
        """
        return tuple(n for e in self for n in ((e,) if isinstance(e, str) else e or ()))

    def dim_axes(self, dim: int) -> tuple[str, ...]:
        """The axis names dimension ``dim`` is split over, major first (``()`` if none).

        Example::

            >>> P(None, ("dp", "tp")).dim_axes(1)
            ('dp', 'tp')
        """
        if dim >= len(self):
            return ()
        entry = self[dim]
        return (entry,) if isinstance(entry, str) else entry or ()

    def __repr__(self) -> str:
        return f"P({', '.join(repr(e) for e in self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PartitionSpec, tuple(self))


#: Short name, as in JAX: ``topo.P("dp", None)``.
P = PartitionSpec

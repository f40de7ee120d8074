"""The one set of argument checks every topo module uses (no torch: the mesh uses it too).

Each check returns the value in its canonical form or raises :class:`~topo.errors.TopoTypeError`
/ :class:`~topo.errors.TopoValueError` in topo's shape: ``"<what> requires <rule>, but got
<value>; <how to fix>"``. ``what`` names the argument as the user wrote it (``"spawn
timeout"``, ``"DeviceMesh axis 'tp' size"``).

The rules, the same everywhere:

- integers: ``int`` and anything with ``__index__`` (NumPy integers); never ``bool``, never a
  float, even an integral one (``2.0``: pass ``int(2.0)``), never a ``str``;
- booleans: ``True``/``False`` (and NumPy booleans) only; never ``"no"`` or ``0``;
- seconds: a real number or a ``timedelta``, positive and finite, at most :data:`MAX_SECONDS`
  (NaN, infinities, ``-0.0`` and bools are refused);
- host addresses: a non-blank string without spaces; ports: integers in ``0..65535``.

Example::

    >>> as_int(3, "DeviceMesh axis 'tp' size", minimum=1)
    3
    >>> as_seconds(1.5, "activate timeout")
    1.5
"""

from __future__ import annotations

import keyword
import math
import numbers
import operator
import unicodedata
from collections.abc import Mapping
from datetime import timedelta

from topo.errors import TopoTypeError, TopoValueError

__all__ = [
    "MAX_SECONDS",
    "as_axis_name",
    "as_bool",
    "as_host",
    "as_int",
    "as_port",
    "as_seconds",
    "as_str_mapping",
    "as_timedelta",
]

#: The longest wait topo accepts: 30 days. Longer values overflow the backends' clocks
#: (gloo and TCPStore count milliseconds in C++) and are a hang in all but name.
MAX_SECONDS = 30 * 24 * 3600.0


def _is_numpy_bool(value: object) -> bool:
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


def as_int(
    value: object,
    what: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    kind: str = "an int",
) -> int:
    """``value`` as an ``int`` within ``minimum..maximum`` (either bound optional); ``kind``
    words the type rule in errors (``"an int index within axis 'tp'"``).

    Example::

        >>> as_int(2, "DeviceMesh axis 'dp' size", minimum=1)
        2
    """
    if (
        type(value) is int
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    ):
        return value  # the common case, first: a plain int in range
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise TopoTypeError(
            f"{what} requires {kind}, but got the bool {value!r}; pass an int like 0 or 1"
        )
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        hint = f"pass int({value!r})" if _is_integral(value) else "pass a whole number"
        raise TopoTypeError(
            f"{what} requires {kind}, but got {type(value).__name__} {value!r}; {hint}"
        )
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TopoTypeError(
            f"{what} requires {kind}, but got {type(value).__name__} {value!r}"
        ) from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        rule = {0: "a non-negative int", 1: "a positive int"}.get(
            minimum if minimum is not None else -1,
            "an int" if minimum is None else f"an int >= {minimum}",
        )
        if maximum is not None:
            rule += f" <= {maximum}"
        raise TopoValueError(f"{what} requires {rule}, but got {number}")
    return number


def _is_integral(value: object) -> bool:
    try:
        return math.isfinite(value) and float(value).is_integer()  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def as_bool(value: object, what: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (a NumPy bool counts); anything else is a
    :class:`~topo.errors.TopoTypeError` (``"no"`` is not ``False``).

    Example::

        >>> as_bool(False, "spawn share_gpu")
        False
    """
    if isinstance(value, bool):
        return value
    if _is_numpy_bool(value):
        return bool(value)
    raise TopoTypeError(
        f"{what} requires True or False, but got {type(value).__name__} {value!r}"
    )


def as_seconds(value: object, what: str) -> float:
    """``value`` (a real number of seconds or a ``timedelta``) as positive, finite seconds.

    Example::

        >>> as_seconds(timedelta(minutes=1), "activate timeout")
        60.0
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or _is_numpy_bool(value):
        raise TopoTypeError(f"{what} requires a number of seconds, but got the bool {value!r}")
    elif isinstance(value, numbers.Real):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float's range: too long, like inf
            seconds = math.inf
    else:
        raise TopoTypeError(
            f"{what} requires a number of seconds (int or float) or a timedelta, but got "
            f"{type(value).__name__} {value!r}"
        )
    if math.isnan(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise TopoValueError(
            f"{what} requires a positive, finite number of seconds up to {MAX_SECONDS:g} "
            f"(30 days), but got {value!r}; pass e.g. 300"
        )
    return seconds


def as_timedelta(value: object, what: str) -> timedelta:
    """:func:`as_seconds` as a ``timedelta``.

    Example::

        >>> as_timedelta(90, "activate timeout")
        datetime.timedelta(seconds=90)
    """
    return timedelta(seconds=as_seconds(value, what))


def as_axis_name(value: object, what: str) -> str:
    """An axis name: a ``str`` identifier, NFKC-normal, not a Python keyword.

    Example::

        >>> as_axis_name("tp", "DeviceMesh axis name")
        'tp'
    """
    if not isinstance(value, str):
        raise TopoTypeError(
            f"{what} requires a str axis name, but got {type(value).__name__} {value!r}"
        )
    if (
        not value.isidentifier()
        or keyword.iskeyword(value)
        or unicodedata.normalize("NFKC", value) != value
    ):
        raise TopoValueError(
            f"{what} requires an identifier (like 'dp' or 'tp'; NFKC-normal, not a Python "
            f"keyword), but got {value!r}"
        )
    return value


def as_host(value: object, what: str) -> str:
    """A host name or address: a non-blank ``str`` without spaces, stripped of nothing.

    Example::

        >>> as_host("10.0.0.1", "World master_addr")
        '10.0.0.1'
    """
    if not isinstance(value, str):
        raise TopoTypeError(
            f"{what} requires a host name or address as a str, but got "
            f"{type(value).__name__} {value!r}"
        )
    if not value or value != value.strip() or any(c.isspace() for c in value):
        raise TopoValueError(
            f"{what} requires a host name or address like '10.0.0.1' or 'node01' (no blanks), "
            f"but got {value!r}; set MASTER_ADDR to rank 0's address"
        )
    return value


def as_port(value: object, what: str) -> int:
    """A TCP port, ``0..65535`` (0: let the kernel pick).

    Example::

        >>> as_port(29500, "World master_port")
        29500
    """
    return as_int(value, what, minimum=0, maximum=65535)


def as_str_mapping(value: object, what: str) -> dict[str, str]:
    """A mapping of ``str`` to ``str`` (environment variables), copied into a dict.

    Example::

        >>> as_str_mapping({"OMP_NUM_THREADS": "1"}, "spawn env")
        {'OMP_NUM_THREADS': '1'}
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TopoTypeError(
            f"{what} requires a mapping of str to str like {{'OMP_NUM_THREADS': '1'}}, but got "
            f"{type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TopoTypeError(
                f"{what} requires str names and str values, but got {key!r}: "
                f"{type(item).__name__} {item!r}; pass str(value)"
            )
        if not key or "=" in key or "\0" in key or "\0" in item:
            raise TopoValueError(
                f"{what} requires environment variable names without '=' or NUL and values "
                f"without NUL, but got {key!r}={item!r}"
            )
    return dict(value)

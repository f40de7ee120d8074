"""topo/_checks.py over odd inputs: every outcome is the canonical value or a TopoTypeError /
TopoValueError whose message names the argument and says what it requires, never another
exception; and World and DeviceMesh, which both use these checks, agree."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import topo
from topo._checks import (
    MAX_SECONDS,
    as_bool,
    as_host,
    as_int,
    as_port,
    as_seconds,
    as_str_mapping,
)
from topo.errors import TopoTypeError, TopoValueError

WHAT = "probe argument 'x'"  # the argument name every message must carry

NUMPY_INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
NUMPY_FLOATS = [np.float16, np.float32, np.float64]


def _numpy_int(dtype: Any) -> st.SearchStrategy[Any]:
    info = np.iinfo(dtype)
    return st.integers(int(info.min), int(info.max)).map(dtype)


# Huge ints that float() cannot convert (10**400) are left to as_int/as_port here: see
# test_seconds_of_an_int_too_large_for_a_float below.
FLOATABLE_INTS = st.integers(-(2**1000), 2**1000)

ODD_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.integers(),  # small and, now and then, big
    st.sampled_from([0, 1, -1, 65535, 65536, 2**31 - 1, 2**63, 2**64, -(2**63)]),
    FLOATABLE_INTS,
    st.one_of(*[_numpy_int(t) for t in NUMPY_INTS]),
    st.booleans(),
    st.booleans().map(np.bool_),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN, ±inf, -0.0, huge, tiny
    st.integers(-(2**53), 2**53).map(float),  # integral floats
    st.sampled_from([-0.0, 0.0, 2.0, math.nan, math.inf, -math.inf, 1e300, MAX_SECONDS]),
    st.sampled_from(NUMPY_FLOATS).flatmap(
        lambda t: st.floats(allow_nan=True, allow_infinity=True, width=np.finfo(t).bits).map(t)
    ),
    st.text(max_size=12),
    st.sampled_from(["5", "2.0", " ", "", "node01", "10.0.0.1", "a b", "no", "True"]),
    st.timedeltas(),
    st.none(),
    st.binary(max_size=4),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
    st.dictionaries(
        st.one_of(st.text(max_size=3), st.integers()),
        st.one_of(st.text(max_size=3), st.integers(), st.none()),
        max_size=3,
    ),
    st.lists(st.integers(), max_size=2),
)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not _is_bool(value)


def _is_real(value: object) -> bool:
    return _is_int(value) or isinstance(value, float | np.floating)


Outcome = tuple[str, Any]  # ("ok", canonical value) or ("error", exception class)


def _expect_int(value: object, lo: int | None = None, hi: int | None = None) -> Outcome:
    if not _is_int(value):
        return ("error", TopoTypeError)
    number = int(value)  # type: ignore[call-overload]
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        return ("error", TopoValueError)
    return ("ok", number)


def _expect_bool(value: object) -> Outcome:
    return ("ok", bool(value)) if _is_bool(value) else ("error", TopoTypeError)  # type: ignore[arg-type]


def _expect_seconds(value: object) -> Outcome:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif _is_real(value):
        seconds = float(value)  # type: ignore[arg-type]
    else:
        return ("error", TopoTypeError)
    if math.isnan(seconds) or not 0 < seconds <= MAX_SECONDS:  # -0.0, NaN, ±inf: refused
        return ("error", TopoValueError)
    return ("ok", seconds)


def _expect_host(value: object) -> Outcome:
    if not isinstance(value, str):
        return ("error", TopoTypeError)
    if not value or any(c.isspace() for c in value):
        return ("error", TopoValueError)
    return ("ok", value)


def _expect_str_mapping(value: object) -> Outcome:
    if value is None:
        return ("ok", {})
    if not isinstance(value, Mapping):
        return ("error", TopoTypeError)
    for key, item in value.items():  # the first offending item decides
        if not isinstance(key, str) or not isinstance(item, str):
            return ("error", TopoTypeError)
        if not key or "=" in key or "\0" in key or "\0" in item:
            return ("error", TopoValueError)
    return ("ok", dict(value))


CHECKS: dict[str, tuple[Callable[[object, str], Any], Callable[[object], Outcome], type]] = {
    "as_int": (as_int, _expect_int, int),
    "as_bool": (as_bool, _expect_bool, bool),
    "as_seconds": (as_seconds, _expect_seconds, float),
    "as_host": (as_host, _expect_host, str),
    "as_port": (as_port, lambda v: _expect_int(v, 0, 65535), int),
    "as_str_mapping": (as_str_mapping, _expect_str_mapping, dict),
}


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(CHECKS)), value=ODD_VALUES)
@example(name="as_int", value=np.int64(3))
@example(name="as_int", value=np.uint64(2**64 - 1))
@example(name="as_int", value=True)
@example(name="as_int", value=np.bool_(False))
@example(name="as_int", value=2.0)
@example(name="as_int", value=np.float64(2.0))
@example(name="as_int", value=10**400)
@example(name="as_port", value=-0.0)
@example(name="as_port", value=np.int32(65536))
@example(name="as_bool", value=0)
@example(name="as_seconds", value=-0.0)
@example(name="as_seconds", value=math.nan)
@example(name="as_seconds", value=-math.inf)
@example(name="as_seconds", value=np.int64(5))
@example(name="as_seconds", value=True)
@example(name="as_seconds", value=timedelta(days=31))
@example(name="as_host", value=" node01")
@example(name="as_str_mapping", value={"A": 1})
@example(name="as_str_mapping", value={"A=B": "1"})
def test_every_check_gives_the_canonical_value_or_its_own_error(name: str, value: Any) -> None:
    check, expect, canonical_type = CHECKS[name]
    kind, expected = expect(value)
    try:
        got = check(value, WHAT)
    except (TopoTypeError, TopoValueError) as error:
        assert kind == "error", f"{name}({value!r}) raised {error!r}, expected {expected!r}"
        assert type(error) is expected, f"{name}({value!r}) raised {error!r}, not {expected}"
        message = str(error)
        assert WHAT in message and "requires" in message, message
        integral = isinstance(value, float | np.floating) and float(value).is_integer()
        if name in ("as_int", "as_port") and integral:
            assert "int(" in message, message  # the fix is spelled out: pass int(2.0)
        return
    # any other exception type propagates and fails the test
    assert kind == "ok", f"{name}({value!r}) returned {got!r}, expected {expected.__name__}"
    assert type(got) is canonical_type, (name, value, got)
    assert got == expected, (name, value, got)


def test_seconds_of_an_int_too_large_for_a_float() -> None:
    with pytest.raises(TopoValueError, match="requires a positive, finite number of seconds"):
        as_seconds(10**400, WHAT)


@pytest.mark.parametrize("value", [np.bool_(True), np.bool_(False)])
def test_numpy_bools_are_bools(value: Any) -> None:
    got = as_bool(value, WHAT)
    assert type(got) is bool and got == bool(value)


# ---------------------------------------------------------------- World and DeviceMesh agree


@pytest.mark.parametrize("make", [np.int8, np.int32, np.int64, np.uint8, np.uint64, int])
def test_world_and_mesh_both_accept_numpy_ints(make: Callable[[int], Any]) -> None:
    world = topo.World(rank=make(1), world_size=make(2), local_rank=make(1),
                       local_world_size=make(2), master_port=make(123))  # fmt: skip
    assert world == topo.World(rank=1, world_size=2, master_port=123)
    assert all(type(v) is int for v in (world.rank, world.world_size, world.master_port))
    mesh = topo.DeviceMesh(dp=make(2), tp=make(1))
    assert mesh == topo.DeviceMesh(dp=2, tp=1) and hash(mesh) == hash(topo.DeviceMesh(dp=2, tp=1))
    assert all(type(n) is int for n in mesh.axis_sizes)


@pytest.mark.parametrize("bad", [2.0, np.float64(2.0), np.float32(2.0), True, np.bool_(True), "2"])
def test_world_and_mesh_both_refuse_non_ints(bad: Any) -> None:
    with pytest.raises(TopoTypeError) as from_world:
        topo.World(rank=0, world_size=bad)
    with pytest.raises(TopoTypeError) as from_mesh:
        topo.DeviceMesh(tp=bad)
    assert "World world_size requires an int" in str(from_world.value)
    assert "DeviceMesh axis 'tp' size requires an int" in str(from_mesh.value)
    if isinstance(bad, float | np.floating):  # both suggest the same fix
        assert "int(" in str(from_world.value) and "int(" in str(from_mesh.value)

"""Properties of collective semantics, checked with hypothesis on topo.simulate.

Random meshes (2–3 axes, up to 8 ranks), shapes, dims and dtypes. Every rank draws its own
input from (seed, rank), so a rank can rebuild any peer's input. Values are small integers
(also in float dtypes), so sums are exact and comparisons can be exact. 6 properties × 50
examples = 300 simulations (a few seconds).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _all_to_allv_fns import make_input  # one maker of small exact inputs for both
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh

PROPERTY = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WAIT = 30.0
NAMES = ("a", "b", "c")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32, torch.int8)
ANY_DTYPES = (*DTYPES, torch.bool, torch.complex64, torch.uint8, torch.float16)


@st.composite
def meshes(draw: st.DrawFn) -> DeviceMesh:
    count = draw(st.integers(2, 3))
    sizes: list[int] = []
    for _ in range(count):
        room = 8 // max(1, _prod(sizes))
        sizes.append(draw(st.integers(1, min(4, room))))
    return DeviceMesh(**dict(zip(NAMES, sizes, strict=False)))


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


@st.composite
def axes(draw: st.DrawFn, mesh: DeviceMesh) -> Any:
    names = mesh.axis_names
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    return chosen[0] if len(chosen) == 1 else tuple(chosen)


@st.composite
def cases(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = DTYPES) -> dict[str, Any]:
    """A mesh, an axis of it, and a shape whose dimension ``dim`` is divisible by the axis
    size (so every chunking collective applies)."""
    mesh = draw(meshes())
    axis = draw(axes(mesh))
    n = mesh.axis_size(axis)
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    dim = draw(st.integers(0, ndim - 1))
    shape[dim] *= n
    return {
        "mesh": mesh,
        "axis": axis,
        "n": n,
        "shape": tuple(shape),
        "dim": dim,
        "other": draw(st.integers(0, ndim - 1)),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _run(case: dict[str, Any], fn: Any) -> None:
    results = topo.simulate(case["mesh"], fn, case, timeout=WAIT)
    assert results == [True] * case["mesh"].size


def _mine(case: dict[str, Any]) -> torch.Tensor:
    return make_input(case["seed"], topo.current().rank, case["shape"], case["dtype"])


def _reduce_scatter_then_all_gather(case: dict[str, Any]) -> bool:
    x, axis, dim = _mine(case), case["axis"], case["dim"]
    op = "sum" if x.dtype == torch.int8 else ["sum", "max", "min"][case["seed"] % 3]
    gathered = topo.all_gather(topo.reduce_scatter(x, axis, dim=dim, op=op), axis, dim=dim)
    assert torch.equal(gathered, topo.all_reduce(x, axis, op=op))
    return True


@PROPERTY
@given(cases())
def test_reduce_scatter_then_all_gather_is_all_reduce(case: dict[str, Any]) -> None:
    _run(case, _reduce_scatter_then_all_gather)


def _all_to_all_twice(case: dict[str, Any]) -> bool:
    x, axis, split, concat = _mine(case), case["axis"], case["dim"], case["other"]
    there = topo.all_to_all(x, axis, split_dim=split, concat_dim=concat)
    back = topo.all_to_all(there, axis, split_dim=concat, concat_dim=split)
    assert torch.equal(back, x)
    return True


@PROPERTY
@given(cases(ANY_DTYPES))
def test_all_to_all_twice_with_swapped_dims_is_the_identity(case: dict[str, Any]) -> None:
    _run(case, _all_to_all_twice)


def _ppermute_and_back(case: dict[str, Any]) -> bool:
    x, axis, n = _mine(case), case["axis"], case["n"]
    g = torch.Generator().manual_seed(case["seed"])
    target = torch.randperm(n, generator=g).tolist()
    perm = [(i, target[i]) for i in range(n)]
    moved = topo.ppermute(x, axis, perm)
    assert torch.equal(topo.ppermute(moved, axis, [(d, s) for s, d in perm]), x)
    # index j received the input of index target^-1(j)
    src = target.index(topo.axis_index(axis))
    peer = topo.current().group(axis)[src]
    assert torch.equal(moved, make_input(case["seed"], peer, case["shape"], case["dtype"]))
    return True


@PROPERTY
@given(cases(ANY_DTYPES))
def test_ppermute_then_inverse_is_the_identity(case: dict[str, Any]) -> None:
    _run(case, _ppermute_and_back)


def _shift_and_back(case: dict[str, Any]) -> bool:
    x, axis = _mine(case), case["axis"]
    k = case["seed"] % 7 - 3
    assert torch.equal(topo.shift(topo.shift(x, axis, k), axis, -k), x)
    return True


@PROPERTY
@given(cases(ANY_DTYPES))
def test_shift_then_back_with_wrap_is_the_identity(case: dict[str, Any]) -> None:
    _run(case, _shift_and_back)


def _broadcast_then_all_reduce(case: dict[str, Any]) -> bool:
    x, axis, n = _mine(case), case["axis"], case["n"]
    src = case["seed"] % n
    b = topo.broadcast(x, axis, src=src)
    peer = topo.current().group(axis)[src]
    expected = make_input(case["seed"], peer, case["shape"], case["dtype"])
    assert torch.equal(b, expected)
    assert torch.equal(topo.all_reduce(b, axis), expected * n)
    return True


@PROPERTY
@given(cases(tuple(d for d in DTYPES if d != torch.int8)))  # n·x may overflow int8
def test_broadcast_then_all_reduce_is_n_times_the_source(case: dict[str, Any]) -> None:
    _run(case, _broadcast_then_all_reduce)


def _tuple_axis_is_composition(case: dict[str, Any]) -> bool:
    x, dim = _mine(case), case["dim"]
    names = topo.current().mesh.axis_names
    outer, inner = names[0], names[1]
    both = (outer, inner)
    assert torch.equal(
        topo.all_reduce(x, both), topo.all_reduce(topo.all_reduce(x, inner), outer)
    )
    assert torch.equal(
        topo.all_gather(x, both, dim=dim),
        topo.all_gather(topo.all_gather(x, inner, dim=dim), outer, dim=dim),
    )
    index = topo.axis_index(both)
    assert index == topo.axis_index(outer) * topo.axis_size(inner) + topo.axis_index(inner)
    return True


@PROPERTY
@given(cases(tuple(d for d in DTYPES if d != torch.int8)))
def test_tuple_axis_results_equal_the_composition_over_single_axes(case: dict[str, Any]) -> None:
    _run(case, _tuple_axis_is_composition)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composition_property_holds_for_a_fixed_float_case(dtype: torch.dtype) -> None:
    case = {"mesh": DeviceMesh(a=2, b=2, c=2), "shape": (4, 2), "dim": 0, "dtype": dtype,
            "seed": 7}  # fmt: skip
    _run(case, _tuple_axis_is_composition)

"""Properties of topo.mesh.DeviceMesh: pure rank math checked against NumPy, brute force,
and independent re-derivations of vLLM's and Megatron-LM's group layouts."""

from __future__ import annotations

import doctest
import importlib
import itertools
import keyword
import math
import pickle
import re
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import topo.mesh
import topo.placement
from topo.mesh import DeviceMesh
from topo.placement import Placement, parse_mesh

# ----------------------------------------------------------------------------- strategies

# database=None: no .hypothesis/ directory is written into the repository.
FAST = settings(
    deadline=None, max_examples=100, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SLOW = settings(
    deadline=None, max_examples=40, database=None, suppress_health_check=[HealthCheck.too_slow]
)

names_st = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,4}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s)
)


@st.composite
def meshes(draw: st.DrawFn, max_axes: int = 6, max_size: int = 4096) -> DeviceMesh:
    """A mesh of 1..max_axes axes, sizes 1..8, random identifier names, at most max_size ranks.

    Sizes are drawn under a shrinking budget (so whole-mesh enumeration stays cheap) and then
    permuted, so a large axis can sit anywhere in the mesh.
    """
    n = draw(st.integers(1, max_axes))
    names = draw(st.lists(names_st, min_size=n, max_size=n, unique=True))
    budget = max_size
    sizes = []
    for _ in range(n):
        s = draw(st.integers(1, max(1, min(8, budget))))
        sizes.append(s)
        budget //= s
    sizes = draw(st.permutations(sizes))
    return DeviceMesh.from_shape(sizes, names)


# Meshes up to the full 8**6 = 262,144 ranks, for per-rank properties that never enumerate.
big_meshes = meshes(max_size=8**6)


@st.composite
def axis_subsets(draw: st.DrawFn, mesh: DeviceMesh, min_size: int = 1) -> tuple[str, ...]:
    """A non-empty subset of the mesh's axes, in a random order."""
    k = draw(st.integers(min_size, mesh.ndim))
    return tuple(draw(st.permutations(mesh.axis_names))[:k])


def mesh_order(mesh: DeviceMesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(axes, key=mesh.axis_names.index))


def layout(mesh: DeviceMesh) -> np.ndarray:
    return np.arange(mesh.size).reshape(mesh.axis_sizes)


def numpy_groups(mesh: DeviceMesh, axes: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Groups along ``axes`` from NumPy: move those axes (in mesh order) last, then flatten."""
    pos = sorted(mesh.axis_names.index(a) for a in axes)
    arr = np.moveaxis(layout(mesh), pos, list(range(mesh.ndim - len(pos), mesh.ndim)))
    size = math.prod(mesh.axis_sizes[p] for p in pos)
    return [tuple(int(x) for x in row) for row in arr.reshape(-1, size)]


# ----------------------------------------------------------------------------- groups


@FAST
@given(st.data())
def test_groups_partition_ranks(data: st.DataObject) -> None:
    mesh = data.draw(meshes(max_size=1024))
    axis = data.draw(st.sampled_from(mesh.axis_names) | axis_subsets(mesh))
    groups = mesh.groups(axis)
    flat = [r for g in groups for r in g]
    assert sorted(flat) == list(range(mesh.size))  # every rank exactly once
    assert all(len(g) == mesh.axis_size(axis) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)  # ordered by first rank
    assert all(g[0] == min(g) for g in groups)
    assert len(groups) == mesh.num_groups(axis) == mesh.size // mesh.axis_size(axis)
    assert tuple(mesh.iter_groups(axis)) == groups
    for i, g in enumerate(groups):
        for j, r in enumerate(g):
            assert mesh.group(axis, r) == g
            assert mesh.group_index(axis, r) == i
            assert mesh.axis_index(axis, r) == j


@FAST
@given(st.data())
def test_groups_match_numpy(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    axes = data.draw(axis_subsets(mesh))
    expected = numpy_groups(mesh, axes)
    assert list(mesh.groups(axes)) == expected
    if len(axes) == 1:
        assert list(mesh.groups(axes[0])) == expected
    for r in data.draw(st.lists(st.integers(0, mesh.size - 1), min_size=1, max_size=5)):
        assert mesh.group(axes, r) == next(g for g in expected if r in g)


@FAST
@given(st.data())
def test_coords_match_numpy_unravel(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    r = data.draw(st.integers(0, mesh.size - 1))
    expected = tuple(int(c) for c in np.unravel_index(r, mesh.axis_sizes))
    assert tuple(mesh.coords(r).values()) == expected
    assert list(mesh.coords(r)) == list(mesh.axis_names)
    assert int(np.ravel_multi_index(expected, mesh.axis_sizes)) == r


@FAST
@given(st.data())
def test_coords_rank_of_round_trip(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    r = data.draw(st.integers(0, mesh.size - 1))
    assert mesh.rank_of(**mesh.coords(r)) == r
    coords = {n: data.draw(st.integers(0, s - 1)) for n, s in mesh.shape.items()}
    assert mesh.coords(mesh.rank_of(**coords)) == coords
    # the rank formula: rank = sum(coord[i] * prod(size[j] for j > i))
    expected = sum(
        coords[n] * math.prod(mesh.axis_sizes[i + 1 :]) for i, n in enumerate(mesh.axis_names)
    )
    assert mesh.rank_of(**coords) == expected
    for n in mesh.axis_names:
        assert mesh.stride(n) == math.prod(mesh.axis_sizes[mesh.axis_names.index(n) + 1 :])


@FAST
@given(st.data())
def test_complementary_groups_meet_in_one_rank(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    assume(mesh.ndim >= 2)
    a = data.draw(axis_subsets(mesh))
    assume(len(a) < mesh.ndim)
    b = tuple(n for n in mesh.axis_names if n not in a)
    r = data.draw(st.integers(0, mesh.size - 1))
    s = data.draw(st.integers(0, mesh.size - 1))
    assume(mesh.axis_size(a) * mesh.axis_size(b) <= 8**4)
    meet = set(mesh.group(a, r)) & set(mesh.group(b, s))
    cr, cs = mesh.coords(r), mesh.coords(s)
    # group(a, r) fixes r's coordinates off a; group(b, s) fixes s's coordinates on a
    expected = mesh.rank_of(**{n: (cs[n] if n in a else cr[n]) for n in mesh.axis_names})
    assert meet == {expected}


@FAST
@given(st.data())
def test_tuple_group_is_product_of_single_groups(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    axes = data.draw(axis_subsets(mesh))
    r = data.draw(st.integers(0, mesh.size - 1))
    # set: iterated union of single-axis groups
    reached = {r}
    for a in axes:
        reached = {y for x in reached for y in mesh.group(a, x)}
    g = mesh.group(axes, r)
    assert set(g) == reached
    # order: row-major in mesh order, whatever order the names were given in
    ordered = mesh_order(mesh, axes)
    assert mesh.normalize_axis(axes) == ordered
    assert mesh.group(ordered, r) == g
    assert mesh.group(list(reversed(axes)), r) == g
    assert g == tuple(sorted(g))  # row-major over mesh-ordered axes is ascending
    expected = [r]
    for a in ordered:  # outer axis first, each later axis varies faster
        expected = [y for x in expected for y in mesh.group(a, x)]
    assert list(g) == expected
    assert mesh.axis_size(axes) == math.prod(mesh.axis_size(a) for a in axes)


@FAST
@given(st.data())
def test_axis_index(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    r = data.draw(st.integers(0, mesh.size - 1))
    c = mesh.coords(r)
    for a in mesh.axis_names:
        assert mesh.axis_index(a, r) == c[a]
        assert mesh.axis_index((a,), r) == c[a]
    axes = data.draw(axis_subsets(mesh))
    ordered = mesh_order(mesh, axes)
    index = 0
    for a in ordered:  # row-major, last (innermost) axis fastest
        index = index * mesh.axis_size(a) + c[a]
    assert mesh.axis_index(axes, r) == index
    if mesh.axis_size(axes) <= 8**4:
        assert mesh.group(axes, r).index(r) == index
        assert mesh.group(axes, r)[index] == r


@FAST
@given(st.data())
def test_group_index_is_coords_on_other_axes(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    axes = data.draw(axis_subsets(mesh))
    r = data.draw(st.integers(0, mesh.size - 1))
    c = mesh.coords(r)
    index = 0
    for a in mesh.axis_names:
        if a not in axes:
            index = index * mesh.axis_size(a) + c[a]
    assert mesh.group_index(axes, r) == index
    assert 0 <= index < mesh.num_groups(axes)


# ----------------------------------------------------------------------------- neighbours


@FAST
@given(st.data())
def test_neighbor_first_last(data: st.DataObject) -> None:
    mesh = data.draw(big_meshes)
    axes = data.draw(st.sampled_from(mesh.axis_names) | axis_subsets(mesh))
    n = mesh.axis_size(axes)
    r = data.draw(st.integers(0, mesh.size - 1))
    k = data.draw(st.integers(-2 * n - 1, 2 * n + 1))
    i = mesh.axis_index(axes, r)
    fwd = mesh.neighbor(axes, r, k)
    assert fwd is not None
    assert mesh.neighbor(axes, fwd, -k) == r
    assert mesh.axis_index(axes, fwd) == (i + k) % n
    assert mesh.group_index(axes, fwd) == mesh.group_index(axes, r)
    assert mesh.neighbor(axes, r, offset=k, wrap=True) == fwd
    nowrap = mesh.neighbor(axes, r, k, wrap=False)
    if 0 <= i + k < n:
        assert nowrap == fwd
    else:
        assert nowrap is None
    assert mesh.neighbor(axes, r, 0) == r
    assert mesh.neighbor(axes, r) == mesh.neighbor(axes, r, 1)
    if n <= 8**4:
        g = mesh.group(axes, r)
        assert fwd == g[(i + k) % n]
        assert mesh.first(axes, r) == g[0]
        assert mesh.last(axes, r) == g[-1]
    assert mesh.is_first(axes, r) == (i == 0) == (mesh.first(axes, r) == r)
    assert mesh.is_last(axes, r) == (i == n - 1) == (mesh.last(axes, r) == r)
    assert mesh.axis_index(axes, mesh.first(axes, r)) == 0
    assert mesh.axis_index(axes, mesh.last(axes, r)) == n - 1


def test_neighbor_examples() -> None:
    mesh = DeviceMesh(pp=4, tp=2)
    assert [mesh.neighbor("pp", r) for r in range(8)] == [2, 3, 4, 5, 6, 7, 0, 1]
    assert [mesh.neighbor("pp", r, -1) for r in range(8)] == [6, 7, 0, 1, 2, 3, 4, 5]
    assert [mesh.neighbor("pp", r, wrap=False) for r in range(8)] == [2, 3, 4, 5, 6, 7, None, None]
    assert [mesh.neighbor("pp", r, -1, wrap=False) for r in range(8)] == [
        None,
        None,
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    assert mesh.neighbor(("pp", "tp"), 7) == 0
    assert mesh.neighbor(("tp", "pp"), 3, 2) == 5


# ----------------------------------------------------------------------------- placement


@FAST
@given(st.data())
def test_placement_matches_brute_force(data: st.DataObject) -> None:
    mesh = data.draw(meshes(max_size=1024))
    divisors = [d for d in range(1, mesh.size + 1) if mesh.size % d == 0]
    rpn = data.draw(st.sampled_from(divisors))
    p = mesh.placement(rpn)
    assert isinstance(p, Placement)
    assert p == Placement(mesh, rpn)
    intra: list[str] = []
    inter: list[str] = []
    for a in reversed(mesh.axis_names):  # fastest axis first
        same_node = all(len({r // rpn for r in g}) == 1 for g in mesh.groups(a))
        (intra if same_node else inter).append(a)
    assert p.intra_node_axes == tuple(intra)
    assert p.inter_node_axes == tuple(inter)
    assert p.mesh == mesh
    assert p.ranks_per_node == rpn
    assert p.num_nodes == mesh.size // rpn
    for a in mesh.axis_names:
        assert p.spans_nodes(a) == (a in inter)
    for r in range(0, mesh.size, max(1, mesh.size // 64)):
        assert p.node_of(r) == r // rpn


def test_placement_examples() -> None:
    mesh = DeviceMesh(dp=2, pp=2, tp=4)
    assert mesh.placement(ranks_per_node=8).intra_node_axes == ("tp", "pp")
    p = mesh.placement(4)
    assert (p.intra_node_axes, p.inter_node_axes) == (("tp",), ("pp", "dp"))
    assert p.num_nodes == 4
    assert [p.node_of(r) for r in range(16)] == [r // 4 for r in range(16)]
    assert mesh.placement(1).intra_node_axes == ()
    assert mesh.placement(16).inter_node_axes == ()
    assert pickle.loads(pickle.dumps(p)) == p
    assert "ranks_per_node=4" in repr(p)


# ----------------------------------------------------------------------------- derived meshes


@FAST
@given(st.data())
def test_submesh(data: st.DataObject) -> None:
    mesh = data.draw(meshes())
    axes = data.draw(axis_subsets(mesh))
    sub = mesh.submesh(*axes)
    ordered = mesh_order(mesh, axes)
    assert sub.axis_names == ordered
    assert sub.axis_sizes == tuple(mesh.axis_size(a) for a in ordered)
    assert sub.size == mesh.axis_size(axes)
    r = data.draw(st.integers(0, mesh.size - 1))
    g = mesh.group(axes, r)
    cr = mesh.coords(r)
    for i in range(sub.size):
        c = mesh.coords(g[i])
        assert sub.coords(i) == {a: c[a] for a in ordered}
        assert all(c[a] == cr[a] for a in mesh.axis_names if a not in axes)
        assert mesh.axis_index(axes, g[i]) == i


@FAST
@given(st.data())
def test_flatten_adjacent(data: st.DataObject) -> None:
    mesh = data.draw(meshes(max_size=1024))
    i = data.draw(st.integers(0, mesh.ndim - 1))
    j = data.draw(st.integers(i, mesh.ndim - 1))
    merged = mesh.axis_names[i : j + 1]
    keep = mesh.axis_names[:i] + mesh.axis_names[j + 1 :]
    name = data.draw(names_st.filter(lambda s: s not in keep))
    given_order = data.draw(st.permutations(merged))
    flat = mesh.flatten(tuple(given_order), name)
    assert flat.axis_names == (*mesh.axis_names[:i], name, *mesh.axis_names[j + 1 :])
    assert flat.size == mesh.size
    assert flat.axis_size(name) == mesh.axis_size(merged)
    assert flat.groups(name) == mesh.groups(merged)
    for r in range(0, mesh.size, max(1, mesh.size // 97)):
        assert flat.group(name, r) == mesh.group(merged, r)
        assert flat.axis_index(name, r) == mesh.axis_index(merged, r)
    for a in keep:
        assert flat.groups(a) == mesh.groups(a)


@FAST
@given(st.data())
def test_flatten_non_adjacent_raises(data: st.DataObject) -> None:
    mesh = data.draw(meshes(max_axes=6))
    assume(mesh.ndim >= 3)
    i = data.draw(st.integers(0, mesh.ndim - 3))
    j = data.draw(st.integers(i + 2, mesh.ndim - 1))
    axes = (mesh.axis_names[j], mesh.axis_names[i])
    with pytest.raises(ValueError, match="flatten requires adjacent axes"):
        mesh.flatten(axes, "merged_axis")


def test_flatten_and_submesh_examples() -> None:
    mesh = DeviceMesh(dp=2, pp=2, tp=2)
    assert mesh.flatten(("pp", "tp"), "mp") == DeviceMesh(dp=2, mp=4)
    assert mesh.flatten(("tp", "pp"), "mp") == DeviceMesh(dp=2, mp=4)
    assert mesh.flatten(("dp", "pp"), "dpp") == DeviceMesh(dpp=4, tp=2)
    assert mesh.flatten("tp", "t") == DeviceMesh(dp=2, pp=2, t=2)
    assert mesh.submesh("tp", "dp") == DeviceMesh(dp=2, tp=2)
    with pytest.raises(ValueError, match=r"flatten requires adjacent axes.*\('dp', 'tp'\)"):
        mesh.flatten(("dp", "tp"), "x")
    with pytest.raises(ValueError, match=r"flatten name requires an identifier.*'1x'"):
        mesh.flatten(("pp", "tp"), "1x")
    with pytest.raises(ValueError, match=r"distinct axis names.*'dp' twice"):
        mesh.flatten(("pp", "tp"), "dp")


# ----------------------------------------------------------------------------- value semantics


@FAST
@given(meshes())
def test_value_semantics(mesh: DeviceMesh) -> None:
    assert eval(repr(mesh), {"DeviceMesh": DeviceMesh}) == mesh
    assert repr(mesh) == "DeviceMesh(" + ", ".join(f"{n}={s}" for n, s in mesh.shape.items()) + ")"
    assert str(mesh) == " * ".join(f"{n}({s})" for n, s in mesh.shape.items())
    twin = DeviceMesh.from_shape(list(mesh.axis_sizes), list(mesh.axis_names))
    assert twin == mesh
    assert hash(twin) == hash(mesh)
    assert len({mesh, twin}) == 1
    assert pickle.loads(pickle.dumps(mesh)) == mesh
    clone = pickle.loads(pickle.dumps(mesh))
    assert clone.groups(mesh.axis_names[-1]) == mesh.groups(mesh.axis_names[-1])
    assert DeviceMesh(**dict(mesh.shape)) == mesh
    assert tuple(mesh.shape) == mesh.axis_names
    assert tuple(mesh.shape.values()) == mesh.axis_sizes
    assert mesh.ndim == len(mesh.axis_names)
    assert mesh.size == math.prod(mesh.axis_sizes)


def test_equality_depends_on_order_and_sizes() -> None:
    assert DeviceMesh(dp=2, tp=4) != DeviceMesh(tp=4, dp=2)
    assert DeviceMesh(dp=2, tp=4) != DeviceMesh(dp=4, tp=2)
    assert DeviceMesh(dp=2, tp=4) != DeviceMesh(dp=2, tp=4, pp=1)
    assert DeviceMesh(dp=np.int64(2), tp=4) == DeviceMesh(dp=2, tp=4)
    assert type(DeviceMesh(dp=np.int64(2)).axis_sizes[0]) is int


def test_immutable() -> None:
    mesh = DeviceMesh(dp=2, tp=4)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mesh.axis_names = ("a", "b")  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mesh.size = 3  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mesh.shape = {}  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del mesh.axis_sizes
    with pytest.raises(TypeError):
        mesh.shape["dp"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        del mesh.shape["dp"]  # type: ignore[attr-defined]
    placement = mesh.placement(4)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        placement.ranks_per_node = 2  # type: ignore[misc]
    assert mesh == DeviceMesh(dp=2, tp=4)


def test_methods_do_not_share_mutable_results() -> None:
    mesh = DeviceMesh(dp=2, tp=4)
    c = mesh.coords(5)
    c["dp"] = 0
    assert mesh.coords(5) == {"dp": 1, "tp": 1}


# ----------------------------------------------------------------------------- compatibility


def test_design_example() -> None:
    mesh = DeviceMesh(dp=2, pp=2, tp=2)
    assert mesh.group("tp", 5) == (4, 5)
    assert mesh.groups("pp") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert mesh.groups("dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert mesh.groups(("dp", "tp")) == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert mesh.axis_index(("dp", "tp"), 5) == 3


def test_vllm_seed_example() -> None:
    # vLLM parallel_state.initialize_model_parallel docstring: 8 GPUs, tp=2, pp=4.
    mesh = DeviceMesh(pp=4, tp=2)
    assert mesh.groups("tp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert mesh.groups("pp") == ((0, 2, 4, 6), (1, 3, 5, 7))
    # its code: tp ranks = range(i*tp, (i+1)*tp); pp ranks = range(i, world, world // pp)
    world, tp, pp = 8, 2, 4
    assert [list(g) for g in mesh.groups("tp")] == [
        list(range(i * tp, (i + 1) * tp)) for i in range(world // tp)
    ]
    assert [list(g) for g in mesh.groups("pp")] == [
        list(range(i, world, world // pp)) for i in range(world // pp)
    ]


@pytest.mark.parametrize(("dp", "pp", "tp"), [(2, 4, 2), (1, 2, 4), (3, 2, 2), (2, 1, 8)])
def test_vllm_reshape_formula(dp: int, pp: int, tp: int) -> None:
    # vLLM: all_ranks = arange(W).reshape(-1, dp, pp, tp); tp groups = view(-1, tp);
    # pp groups = transpose(2, 3).reshape(-1, pp); dp groups = transpose(1, 3).reshape(-1, dp).
    world = dp * pp * tp
    all_ranks = np.arange(world).reshape(-1, dp, pp, tp)
    vllm = {
        "tp": all_ranks.reshape(-1, tp),
        "pp": all_ranks.swapaxes(2, 3).reshape(-1, pp),
        "dp": all_ranks.swapaxes(1, 3).reshape(-1, dp),
    }
    mesh = DeviceMesh(dp=dp, pp=pp, tp=tp)
    for axis, arr in vllm.items():
        expected = [tuple(int(x) for x in row) for row in arr]
        assert set(mesh.groups(axis)) == set(expected), axis  # same groups, same inner order
        assert sorted(mesh.groups(axis)) == sorted(expected)


def megatron_groups(world_size: int, parallel_size: list[int], mask: list[bool]) -> list[list[int]]:
    """Independent oracle for Megatron-LM's ``generate_masked_orthogonal_rank_groups``.

    ``parallel_size`` lists the axes fastest first (as Megatron's order string "tp-cp-dp-pp").
    Global strides are the prefix products of those sizes. The group index enumerates the
    masked-out axes and the rank-in-group index the masked axes, each decomposed fastest
    first; the global rank is the sum of index * stride over all axes.
    """

    def prefix_product(sizes: list[int]) -> list[int]:
        out = [1]
        for s in sizes:
            out.append(out[-1] * s)
        return out

    def decompose(index: int, sizes: list[int]) -> list[int]:
        strides = prefix_product(sizes)
        return [(index // d) % s for s, d in zip(sizes, strides[:-1], strict=True)]

    stride = prefix_product(parallel_size)
    masked = [i for i, m in enumerate(mask) if m]
    unmasked = [i for i, m in enumerate(mask) if not m]
    group_size = math.prod(parallel_size[i] for i in masked)
    groups = []
    for g in range(world_size // group_size):
        gidx = decompose(g, [parallel_size[i] for i in unmasked])
        base = sum(c * stride[i] for c, i in zip(gidx, unmasked, strict=True))
        group = []
        for j in range(group_size):
            ridx = decompose(j, [parallel_size[i] for i in masked])
            group.append(base + sum(c * stride[i] for c, i in zip(ridx, masked, strict=True)))
        groups.append(group)
    return groups


def megatron_mesh(order: list[str], sizes: dict[str, int]) -> DeviceMesh:
    """Megatron order "tp-cp-dp-pp" (fastest first) is DeviceMesh(pp=, dp=, cp=, tp=)."""
    rev = list(reversed(order))
    return DeviceMesh.from_shape([sizes[a] for a in rev], rev)


def check_megatron(order: list[str], sizes: dict[str, int]) -> None:
    mesh = megatron_mesh(order, sizes)
    world = mesh.size
    parallel_size = [sizes[a] for a in order]
    for k in range(1, len(order) + 1):
        for chosen in itertools.combinations(order, k):
            mask = [a in chosen for a in order]
            expected = megatron_groups(world, parallel_size, mask)
            got = mesh.groups(chosen)
            assert {tuple(sorted(g)) for g in got} == {tuple(sorted(g)) for g in expected}
            assert [list(g) for g in got] == expected  # same group order, same inner order
            if k == 1:
                assert mesh.groups(chosen[0]) == got


def test_megatron_docstring_example() -> None:
    # Megatron parallel_state docstring: 16 GPUs, tp=2, pp=4 (so dp=2), order "tp-dp-pp".
    mesh = DeviceMesh(pp=4, dp=2, tp=2)
    assert mesh.groups("tp") == tuple((i, i + 1) for i in range(0, 16, 2))
    assert mesh.groups("dp") == (
        (0, 2),
        (1, 3),
        (4, 6),
        (5, 7),
        (8, 10),
        (9, 11),
        (12, 14),
        (13, 15),
    )
    assert mesh.groups("pp") == ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))
    check_megatron(["tp", "dp", "pp"], {"tp": 2, "dp": 2, "pp": 4})


def test_megatron_oracle_known_values() -> None:
    # The oracle itself, on hand-computed values: order tp-pp with tp=2, pp=3.
    assert megatron_groups(6, [2, 3], [True, False]) == [[0, 1], [2, 3], [4, 5]]
    assert megatron_groups(6, [2, 3], [False, True]) == [[0, 2, 4], [1, 3, 5]]
    assert megatron_groups(6, [2, 3], [True, True]) == [[0, 1, 2, 3, 4, 5]]


def test_megatron_tp_cp_dp_pp() -> None:
    order = ["tp", "cp", "dp", "pp"]
    check_megatron(order, {"tp": 2, "cp": 2, "dp": 3, "pp": 2})
    mesh = megatron_mesh(order, {"tp": 2, "cp": 2, "dp": 3, "pp": 2})
    assert mesh == DeviceMesh(pp=2, dp=3, cp=2, tp=2)
    # Megatron's model-parallel group is mask "tp-pp".
    mp = megatron_groups(24, [2, 2, 3, 2], [True, False, False, True])
    assert [list(g) for g in mesh.groups(("pp", "tp"))] == mp
    assert [list(g) for g in mesh.groups(("tp", "pp"))] == mp


@SLOW
@given(st.data())
def test_megatron_random_orders(data: st.DataObject) -> None:
    k = data.draw(st.integers(2, 5))
    order = data.draw(st.permutations(["tp", "cp", "ep", "dp", "pp"]))[:k]
    sizes = {a: data.draw(st.integers(1, 4)) for a in order}
    check_megatron(order, sizes)


# ----------------------------------------------------------------------------- errors

MESH = DeviceMesh(dp=2, pp=2, tp=2)
VALID = re.escape("'dp', 'pp', 'tp'")


def test_no_axes() -> None:
    with pytest.raises(ValueError, match=r"requires at least one axis.*got none"):
        DeviceMesh()
    with pytest.raises(ValueError, match=r"from_shape requires at least one axis.*got none"):
        DeviceMesh.from_shape((), ())


def test_duplicate_names() -> None:
    with pytest.raises(ValueError, match=r"requires distinct axis names.*'dp' twice"):
        DeviceMesh.from_shape((2, 2), ("dp", "dp"))


@pytest.mark.parametrize("name", ["1x", "a-b", "class", "", "a b", "None"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(
        ValueError, match=rf"axis name requires an identifier.*got {re.escape(repr(name))}"
    ):
        DeviceMesh.from_shape((2,), (name,))
    if name.isidentifier():  # keywords can't even be spelled as keyword arguments
        return
    with pytest.raises(ValueError, match=r"axis name requires an identifier"):
        DeviceMesh(**{name: 2})


@pytest.mark.parametrize("name", [1, None, b"dp", ("dp",)])
def test_non_str_names(name: object) -> None:
    with pytest.raises(
        TypeError, match=rf"requires a str axis name, but got {type(name).__name__}"
    ):
        DeviceMesh.from_shape((2,), (name,))  # type: ignore[arg-type]


def test_from_shape_names_as_str() -> None:
    with pytest.raises(TypeError, match=r"names requires a sequence of axis names.*str 'dp'"):
        DeviceMesh.from_shape((2,), "dp")


@pytest.mark.parametrize("size", [0, -1, -8])
def test_non_positive_sizes(size: int) -> None:
    with pytest.raises(ValueError, match=rf"axis 'tp' requires a positive size, but got {size}"):
        DeviceMesh(dp=2, tp=size)


@pytest.mark.parametrize(
    ("size", "what"),
    [
        (True, "bool True"),
        (False, "bool False"),
        (2.0, "float 2.0"),
        ("2", "str '2'"),
        (None, "NoneType None"),
    ],
)
def test_non_int_sizes(size: object, what: str) -> None:
    with pytest.raises(TypeError, match=rf"axis 'tp' size requires an int, but got (the )?{what}"):
        DeviceMesh(dp=2, tp=size)  # type: ignore[arg-type]


def test_from_shape_length_mismatch() -> None:
    with pytest.raises(
        ValueError,
        match=r"one name per dimension.*shape \(2, 2\) \(2 dims\).*\('dp',\) \(1 names\)",
    ):
        DeviceMesh.from_shape((2, 2), ("dp",))


AXIS_CALLS: dict[str, Callable[[DeviceMesh, Any], object]] = {
    "group": lambda m, a: m.group(a, 0),
    "groups": lambda m, a: m.groups(a),
    "iter_groups": lambda m, a: next(m.iter_groups(a)),
    "num_groups": lambda m, a: m.num_groups(a),
    "group_index": lambda m, a: m.group_index(a, 0),
    "axis_size": lambda m, a: m.axis_size(a),
    "axis_index": lambda m, a: m.axis_index(a, 0),
    "neighbor": lambda m, a: m.neighbor(a, 0),
    "first": lambda m, a: m.first(a, 0),
    "last": lambda m, a: m.last(a, 0),
    "is_first": lambda m, a: m.is_first(a, 0),
    "is_last": lambda m, a: m.is_last(a, 0),
    "normalize_axis": lambda m, a: m.normalize_axis(a),
    "submesh": lambda m, a: m.submesh(*a) if isinstance(a, tuple) else m.submesh(a),
    "flatten": lambda m, a: m.flatten(a, "merged"),
}
SINGLE_AXIS_CALLS: dict[str, Callable[[DeviceMesh, Any], object]] = {
    "stride": lambda m, a: m.stride(a),
    "spans_nodes": lambda m, a: m.placement(4).spans_nodes(a),
}


@pytest.mark.parametrize("call", list(AXIS_CALLS) + list(SINGLE_AXIS_CALLS))
def test_unknown_axis_lists_valid_axes(call: str) -> None:
    fn = {**AXIS_CALLS, **SINGLE_AXIS_CALLS}[call]
    with pytest.raises(ValueError, match=rf"unknown axis 'zz'.*has axes {VALID}"):
        fn(MESH, "zz")
    if call in AXIS_CALLS:
        with pytest.raises(ValueError, match=rf"unknown axis 'zz'.*has axes {VALID}"):
            fn(MESH, ("tp", "zz"))


@pytest.mark.parametrize("call", list(AXIS_CALLS))
def test_bad_tuple_axes(call: str) -> None:
    fn = AXIS_CALLS[call]
    with pytest.raises(ValueError, match=r"axis requires distinct names, but got \('tp', 'tp'\)"):
        fn(MESH, ("tp", "tp"))
    with pytest.raises(
        ValueError, match=rf"axis requires at least one name from {VALID}, but got \(\)"
    ):
        fn(MESH, ())


@pytest.mark.parametrize("call", list(AXIS_CALLS))
def test_non_str_axis(call: str) -> None:
    with pytest.raises(TypeError, match=rf"axis requires a .*{VALID}.*but got int 3"):
        AXIS_CALLS[call](MESH, 3)


RANK_CALLS: dict[str, Callable[[DeviceMesh, Any], object]] = {
    "group": lambda m, r: m.group("tp", r),
    "group_index": lambda m, r: m.group_index("tp", r),
    "coords": lambda m, r: m.coords(r),
    "axis_index": lambda m, r: m.axis_index("tp", r),
    "neighbor": lambda m, r: m.neighbor("pp", r),
    "first": lambda m, r: m.first("pp", r),
    "last": lambda m, r: m.last("pp", r),
    "is_first": lambda m, r: m.is_first("pp", r),
    "is_last": lambda m, r: m.is_last("pp", r),
    "node_of": lambda m, r: m.placement(4).node_of(r),
}


@pytest.mark.parametrize("call", list(RANK_CALLS))
@pytest.mark.parametrize("rank", [-1, 8, 100])
def test_rank_out_of_range(call: str, rank: int) -> None:
    with pytest.raises(ValueError, match=rf"rank requires 0 <= rank < 8 .*but got {rank}"):
        RANK_CALLS[call](MESH, rank)


@pytest.mark.parametrize("call", list(RANK_CALLS))
@pytest.mark.parametrize(
    ("rank", "what"),
    [(1.0, "float 1.0"), ("1", "str '1'"), (None, "NoneType None"), (True, "bool True")],
)
def test_rank_not_int(call: str, rank: object, what: str) -> None:
    with pytest.raises(TypeError, match=rf"rank requires an int, but got (the )?{what}"):
        RANK_CALLS[call](MESH, rank)


def test_numpy_int_rank_accepted() -> None:
    assert MESH.group("tp", np.int64(5)) == (4, 5)
    assert MESH.coords(np.int32(7)) == {"dp": 1, "pp": 1, "tp": 1}


def test_neighbor_bad_offset_and_wrap() -> None:
    with pytest.raises(TypeError, match=r"offset requires an int, but got float 1.5"):
        MESH.neighbor("pp", 0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"wrap requires a bool, but got int 1"):
        MESH.neighbor("pp", 0, wrap=1)  # type: ignore[arg-type]


def test_rank_of_errors() -> None:
    with pytest.raises(
        ValueError, match=rf"requires a coordinate for every axis \({VALID}\).*none for 'pp', 'tp'"
    ):
        MESH.rank_of(dp=0)
    with pytest.raises(ValueError, match=rf"unknown axis 'zz'.*has axes {VALID}"):
        MESH.rank_of(dp=0, pp=0, tp=0, zz=0)
    with pytest.raises(ValueError, match=r"coordinate 'tp' requires 0 <= tp < 2, but got 2"):
        MESH.rank_of(dp=0, pp=0, tp=2)
    with pytest.raises(ValueError, match=r"coordinate 'dp' requires 0 <= dp < 2, but got -1"):
        MESH.rank_of(dp=-1, pp=0, tp=0)
    with pytest.raises(TypeError, match=r"coordinate 'pp' requires an int, but got float 1.0"):
        MESH.rank_of(dp=0, pp=1.0, tp=0)  # type: ignore[arg-type]


def test_placement_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"ranks_per_node requires a divisor of the mesh size.*8 ranks.*3 ranks per node.*\[1, 2, 4, 8\]",
    ):
        MESH.placement(3)
    with pytest.raises(ValueError, match=r"ranks_per_node requires a positive int, but got 0"):
        MESH.placement(0)
    with pytest.raises(ValueError, match=r"ranks_per_node requires a positive int, but got -4"):
        MESH.placement(-4)
    with pytest.raises(TypeError, match=r"ranks_per_node requires an int, but got float 4.0"):
        MESH.placement(4.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"spans_nodes|axis requires a str"):
        MESH.placement(4).spans_nodes(("tp",))  # type: ignore[arg-type]


def test_placement_larger_than_mesh() -> None:
    # A node holding more ranks than the mesh has is accepted: the whole mesh is on one node.
    p = MESH.placement(16)
    assert p.num_nodes == 1
    assert p.inter_node_axes == ()
    assert p.intra_node_axes == ("tp", "pp", "dp")


def test_parse_mesh() -> None:
    assert parse_mesh("dp=2,tp=4") == DeviceMesh(dp=2, tp=4)
    assert parse_mesh("dp=2 pp=2, tp=2") == DeviceMesh(dp=2, pp=2, tp=2)
    assert parse_mesh(["dp=2", "tp=4"]) == DeviceMesh(dp=2, tp=4)
    assert parse_mesh(["dp=2,pp=3", "tp=1"]) == DeviceMesh(dp=2, pp=3, tp=1)
    assert parse_mesh(repr(DeviceMesh(a=2, b=3))[len("DeviceMesh(") : -1]) == DeviceMesh(a=2, b=3)


@pytest.mark.parametrize("spec", ["dp", "dp=x", "dp=", "dp=2,tp", "dp:2", "dp=2.0"])
def test_parse_mesh_bad_words(spec: str) -> None:
    with pytest.raises(
        ValueError, match=r"mesh spec requires NAME=SIZE words like dp=2, but got '"
    ):
        parse_mesh(spec)


@pytest.mark.parametrize("spec", ["", " ", ",", []])
def test_parse_mesh_empty(spec: str | list[str]) -> None:
    with pytest.raises(ValueError, match=r"mesh spec requires at least one NAME=SIZE.*got none"):
        parse_mesh(spec)


def test_parse_mesh_bad_values_reach_the_mesh_checks() -> None:
    with pytest.raises(ValueError, match=r"axis 'dp' requires a positive size, but got 0"):
        parse_mesh("dp=0")
    with pytest.raises(ValueError, match=r"axis 'dp' requires a positive size, but got -2"):
        parse_mesh("dp=-2")
    with pytest.raises(ValueError, match=r"requires distinct axis names.*'dp' twice"):
        parse_mesh("dp=2,dp=2")
    with pytest.raises(ValueError, match=r"axis name requires an identifier.*got '1x'"):
        parse_mesh("1x=2")


# ----------------------------------------------------------------------------- doctests, scale


def test_module_doctests() -> None:
    result = doctest.testmod(topo.mesh, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 20
    result = doctest.testmod(topo.placement, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted >= 5
    for name in ("topo.mesh_views", "topo.partition_spec"):
        module = importlib.import_module(name)
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS, extraglobs={"DeviceMesh": DeviceMesh, "P": topo.P}
        )
        assert result.failed == 0 and result.attempted >= 5, module


def test_placement_and_parse_mesh_are_still_importable_from_topo_mesh() -> None:
    from topo.mesh import Placement as OldPlacement
    from topo.mesh import parse_mesh as old_parse_mesh

    assert OldPlacement is Placement and old_parse_mesh is parse_mesh
    assert topo.Placement is Placement and topo.parse_mesh is parse_mesh
    with pytest.raises(AttributeError, match="no attribute 'Placements'"):
        topo.mesh.Placements  # noqa: B018


def test_scale_sanity_million_ranks() -> None:
    sizes = {"dp": 32, "pp": 8, "ep": 8, "cp": 4, "tp": 128}
    mesh = DeviceMesh(**sizes)
    assert mesh.size == 2**20
    r = 2**20 - 1
    stride = {"dp": 8 * 8 * 4 * 128, "pp": 8 * 4 * 128, "ep": 4 * 128, "cp": 128, "tp": 1}
    for a in sizes:
        assert mesh.stride(a) == stride[a]
    assert mesh.coords(r) == {a: s - 1 for a, s in sizes.items()}
    assert mesh.rank_of(**{a: s - 1 for a, s in sizes.items()}) == r
    assert mesh.group("tp", r) == tuple(range(2**20 - 128, 2**20))
    assert mesh.group("dp", r) == tuple(r - (31 - k) * stride["dp"] for k in range(32))
    assert mesh.group(("dp", "tp"), r) == tuple(
        r - (31 - d) * stride["dp"] - (127 - t) for d in range(32) for t in range(128)
    )
    assert mesh.neighbor("pp", r) == r - 7 * stride["pp"]  # wraps to stage 0
    assert mesh.neighbor("pp", r, wrap=False) is None
    assert mesh.neighbor("pp", r, -1) == r - stride["pp"]
    assert mesh.neighbor("tp", r, 5) == r - 127 + 4
    assert mesh.neighbor(("cp", "tp"), r) == r - (4 * 128 - 1)
    assert mesh.axis_index(("ep", "cp", "tp"), r) == 8 * 4 * 128 - 1
    assert mesh.group_index("tp", r) == mesh.num_groups("tp") - 1 == 2**13 - 1
    assert mesh.first("dp", r) == r - 31 * stride["dp"]
    assert mesh.last("dp", 0) == 31 * stride["dp"]
    assert mesh.is_last(("dp", "pp", "ep", "cp", "tp"), r)
    p = mesh.placement(8)
    assert p.node_of(r) == 2**17 - 1
    assert p.intra_node_axes == ()
    assert mesh.placement(512).intra_node_axes == ("tp", "cp")

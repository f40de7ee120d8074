"""Mesh views: unflatten, flatten, submesh and derived axes as pure values (hypothesis
properties against the original mesh's rank math), and ``ctx.view`` sharing the activation's
rendezvous and communicators (counted)."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh


@st.composite
def meshes(draw: st.DrawFn, max_axes: int = 3) -> DeviceMesh:
    ndim = draw(st.integers(1, max_axes))
    sizes = [draw(st.sampled_from([1, 2, 3, 4, 6])) for _ in range(ndim)]
    return DeviceMesh.from_shape(sizes, ["a", "b", "c", "d"][:ndim])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@settings(max_examples=150, deadline=None)
@given(mesh=meshes(), data=st.data())
def test_unflatten_keeps_every_rank_and_the_split_axes_are_the_old_one(
    mesh: DeviceMesh, data: st.DataObject
) -> None:
    axis = data.draw(st.sampled_from(mesh.axis_names))
    n = mesh.shape[axis]
    outer = data.draw(st.sampled_from(_divisors(n)))
    view = mesh.unflatten(axis, x_outer=outer, x_inner=n // outer)
    assert view.size == mesh.size
    for rank in range(mesh.size):
        assert view.group(("x_outer", "x_inner"), rank) == mesh.group(axis, rank)
        assert view.axis_index(("x_outer", "x_inner"), rank) == mesh.axis_index(axis, rank)
        for other in mesh.axis_names:
            if other != axis:
                assert view.group(other, rank) == mesh.group(other, rank)
        # the inner axis: consecutive runs of the old axis's group
        group = mesh.group(axis, rank)
        k = mesh.axis_index(axis, rank)
        start = k - k % (n // outer)
        assert view.group("x_inner", rank) == group[start : start + n // outer]
    assert view.flatten(("x_outer", "x_inner"), axis) == mesh


@settings(max_examples=150, deadline=None)
@given(mesh=meshes(), data=st.data())
def test_a_derived_axis_is_its_tuple_everywhere(mesh: DeviceMesh, data: st.DataObject) -> None:
    over = data.draw(st.lists(st.sampled_from(mesh.axis_names), min_size=1, unique=True))
    derived = mesh.with_axes(ep=tuple(over))
    assert derived.normalize_axis("ep") == mesh.normalize_axis(tuple(over))
    assert derived.axis_size("ep") == math.prod(mesh.shape[a] for a in over)
    assert derived.groups("ep") == mesh.groups(tuple(over))
    for rank in range(mesh.size):
        assert derived.group("ep", rank) == mesh.group(tuple(over), rank)
        assert derived.axis_index("ep", rank) == mesh.axis_index(tuple(over), rank)
        assert derived.neighbor("ep", rank) == mesh.neighbor(tuple(over), rank)
        assert derived.coords(rank) == mesh.coords(rank)  # coordinates: the mesh's axes only
    # a value: equal, hashable and picklable, with the derived axis
    again = pickle.loads(pickle.dumps(derived))
    assert again == derived and hash(again) == hash(derived) and again != mesh
    assert dict(again.derived_axes) == {"ep": mesh.normalize_axis(tuple(over))}
    assert eval(repr(derived), {"DeviceMesh": DeviceMesh}) == derived


def test_views_carry_derived_axes_where_their_axes_survive() -> None:
    mesh = DeviceMesh(pp=2, dp=4, tp=2).with_axes(ep=("dp", "tp"), mp=("pp", "tp"))
    split = mesh.unflatten("dp", rep=2, shard=2)
    assert dict(split.derived_axes) == {"ep": ("rep", "shard", "tp"), "mp": ("pp", "tp")}
    assert split.group("ep", 5) == mesh.group("ep", 5)
    assert dict(mesh.submesh("dp", "tp").derived_axes) == {"ep": ("dp", "tp")}
    assert dict(mesh.flatten(("dp", "tp"), "dptp").derived_axes) == {}
    assert repr(mesh) == "DeviceMesh(pp=2, dp=4, tp=2).with_axes(ep=('dp', 'tp'), mp=('pp', 'tp'))"


def test_view_errors_name_what_was_required() -> None:
    mesh = DeviceMesh(dp=4, tp=2)
    with pytest.raises(topo.TopoValueError, match=r"product is dp's size 4, but got a\(3\) = 3"):
        mesh.unflatten("dp", a=3)
    with pytest.raises(topo.TopoValueError, match="'tp' is already an axis"):
        mesh.unflatten("dp", tp=2, b=2)
    with pytest.raises(topo.TopoValueError, match="requires the new axes"):
        mesh.unflatten("dp")
    with pytest.raises(topo.TopoValueError, match="unknown axis 'pp'"):
        mesh.unflatten("pp", a=2)
    with pytest.raises(topo.TopoValueError, match=r"not an axis of dp.4. \* tp.2., but got .tp.; pick another"):
        mesh.with_axes(tp=("dp",))
    with pytest.raises(topo.TopoTypeError, match="with_axes ep= requires an axis name"):
        mesh.with_axes(ep=3)  # type: ignore[arg-type]
    with pytest.raises(topo.TopoValueError, match="'ep' is a derived axis"):
        mesh.with_axes(ep=("dp", "tp")).stride("ep")
    with pytest.raises(topo.TopoValueError, match="distinct names"):
        mesh.with_axes(ep=("dp", "tp")).group(("ep", "dp"), 0)


# --------------------------------------------------------------------- activation views


def _views() -> dict[str, Any]:
    ctx = topo.current()
    out: dict[str, Any] = {"dp": float(topo.all_reduce(torch.ones(1), "dp"))}
    joins = ctx.coordinator.store.ops
    before = len(ctx._shared)
    split = ctx.mesh.unflatten("dp", rep=2, shard=2).with_axes(ep=("rep", "shard", "tp"))
    with ctx.view(split) as view:
        out["view_is_active"] = topo.current() is view and view is not ctx
        out["rep_shard"] = float(topo.all_reduce(torch.ones(1), ("rep", "shard")))
        out["reused_dp"] = len(ctx._shared) == before  # the same ranks as dp: no new one
        out["view_join_ops"] = ctx.coordinator.store.ops - joins  # no second rendezvous
        out["shard"] = topo.all_gather(torch.tensor([float(ctx.rank)]), "shard").tolist()
        out["ep"] = float(topo.all_reduce(torch.ones(1), "ep"))
        out["tp"] = float(topo.all_reduce(torch.ones(1), "tp"))
    out["communicators"] = len(ctx._shared)
    out["view_closed"] = view.closed
    out["dp_after"] = float(topo.all_reduce(torch.ones(1), "dp"))
    return out


def _check_views(results: list[dict[str, Any]]) -> None:
    mesh = DeviceMesh(dp=4, tp=2)
    split = mesh.unflatten("dp", rep=2, shard=2)
    for rank, out in enumerate(results):
        assert out["view_is_active"] and out["view_closed"]
        assert out["dp"] == out["rep_shard"] == out["dp_after"] == 4.0
        assert out["reused_dp"] and out["view_join_ops"] == 0
        assert out["shard"] == [float(r) for r in split.group("shard", rank)]
        assert out["ep"] == 8.0 and out["tp"] == 2.0
        # dp (shared with rep x shard), shard, ep (the whole world) and tp: four, not five
        assert out["communicators"] == 4


def test_a_view_shares_the_activation_under_simulate() -> None:
    _check_views(topo.simulate(DeviceMesh(dp=4, tp=2), _views))


@pytest.mark.multiprocess
def test_a_view_shares_the_activation_under_spawn(no_leftover_children: None) -> None:
    _check_views(topo.spawn(_views, DeviceMesh(dp=4, tp=2), timeout=300))


def _pair_channels() -> tuple[bool, bool]:
    ctx = topo.current()
    by_pp = ctx._check_channel(("pp",), (0, 1))
    by_both = ctx._check_channel(("dp", "pp"), (0, 1))
    same_ranks = ctx.mesh.group("pp", ctx.rank)[:2] == ctx.mesh.group(("dp", "pp"), ctx.rank)[:2]
    return same_ranks, by_pp is by_both


def test_check_mode_has_one_record_channel_per_pair_of_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two axes whose pairs are the same two ranks meet under one store scope
    # (comm/cpu/pair/0-1), so they must share the channel; a second one would rendezvous
    # again on the same keys.
    monkeypatch.setenv("TOPO_CHECK", "1")
    results = topo.simulate(DeviceMesh(dp=2, pp=2), _pair_channels)
    assert results == [(True, True), (True, True), (False, False), (False, False)]


def test_view_errors() -> None:
    world = topo.World(rank=0, world_size=1, master_port=0)
    with DeviceMesh(tp=1).activate(world, timeout=30) as ctx:
        with pytest.raises(topo.TopoValueError, match="activation's 1 ranks"), ctx.view(
            DeviceMesh(tp=2)
        ):
            pass
        with pytest.raises(topo.TopoTypeError, match=r"requires a topo\.DeviceMesh"), ctx.view(
            "tp"  # type: ignore[arg-type]
        ):
            pass
    with pytest.raises(topo.CommunicationError, match="requires an open activation"), ctx.view(
        DeviceMesh(a=1)
    ):
        pass

"""The collectives' remembered routes: after the first call along an axis, a plain collective
finds its communicator with one dict lookup (``topo.collectives._common.route``) and send/recv
their pair communicator likewise (``topo.collectives.p2p._pair_route``). These tests show that
the remembered route is the communicator the long way finds, that it is remembered only where
that is safe (the innermost activation's own axes, hashable axes, int peers), that closing an
activation forgets it, and that every argument check still runs once it is remembered (the
bad-input table run after warming the routes is in test_bad_inputs.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed

import topo
from topo import DeviceMesh, World

WORLD = World(rank=0, world_size=1, master_port=0)
STORE = torch.distributed.HashStore()
WAIT = 60


def _remembered_two_ranks() -> dict[str, Any]:
    ctx = topo.current()
    i = topo.axis_index("tp")
    x = torch.arange(4.0) + 10 * i
    seen: dict[str, Any] = {"routes_before": dict(ctx._routes)}
    calls = {
        "all_reduce": lambda: topo.all_reduce(x, "tp"),
        "all_reduce max": lambda: topo.all_reduce(x, "tp", op="max"),
        "all_gather": lambda: topo.all_gather(x, "tp"),
        "reduce_scatter": lambda: topo.reduce_scatter(x, "tp"),
        "broadcast": lambda: topo.broadcast(x, "tp", src=1),
        "all_to_all": lambda: topo.all_to_all(x, "tp"),
        "all_gatherv": lambda: topo.all_gatherv(x[: i + 1], "tp", sizes=[1, 2]),
        "gather": lambda: topo.gather(x, "tp", dst=1),
        "scatter": lambda: topo.scatter(x, "tp", src=0),
    }
    for name, call in calls.items():
        first, second = call(), call()  # the long way, then the remembered route
        seen[name] = (first, second)
    seen["route"] = ctx._routes["tp", "cpu"]
    seen["communicator"] = ctx.communicator(("tp",), "cpu")
    # send/recv: twice each way, the second time through the remembered pair route
    peer = 1 - i
    received = []
    for turn in range(2):
        if i == turn % 2:
            topo.send(x + turn, "tp", dst=peer)
        else:
            received.append(topo.recv((4,), torch.float32, "tp", src=peer))
    seen["received"] = received
    seen["pair_route"] = ctx._pair_routes["tp", "cpu", peer]
    seen["pair_communicator"] = ctx.pair_communicator(("tp",), peer, "cpu")
    # a bool peer equals 0 or 1 as a dict key: it must still be refused, not routed
    with pytest.raises(topo.TopoTypeError, match="bool"):
        topo.send(x, "tp", dst=bool(peer))
    with pytest.raises(topo.TopoTypeError, match="bool"):
        topo.recv((4,), torch.float32, "tp", src=bool(peer))
    # this rank's own index, and one outside the axis, are refused with a route remembered
    with pytest.raises(topo.TopoValueError, match="own"):
        topo.send(x, "tp", dst=i)
    with pytest.raises(topo.TopoValueError, match="0 <= dst < 2"):
        topo.send(x, "tp", dst=2)
    return seen


def test_the_remembered_route_is_the_communicator_and_gives_the_same_results() -> None:
    results = topo.simulate(DeviceMesh(tp=2), _remembered_two_ranks, timeout=WAIT)
    xs = [torch.arange(4.0) + 10 * i for i in range(2)]
    expected = {
        "all_reduce": [xs[0] + xs[1]] * 2,
        "all_reduce max": [torch.maximum(xs[0], xs[1])] * 2,
        "all_gather": [torch.cat(xs)] * 2,
        "reduce_scatter": [(xs[0] + xs[1])[:2], (xs[0] + xs[1])[2:]],
        "broadcast": [xs[1]] * 2,
        "all_to_all": [torch.cat([xs[0][:2], xs[1][:2]]), torch.cat([xs[0][2:], xs[1][2:]])],
        "all_gatherv": [torch.cat([xs[0][:1], xs[1][:2]])] * 2,
        "scatter": [xs[0][:2], xs[0][2:]],
    }
    for rank, seen in enumerate(results):
        assert seen["routes_before"] == {}
        for name, wanted in expected.items():
            first, second = seen[name]
            assert torch.equal(first, wanted[rank]), (name, rank, first)
            assert torch.equal(second, wanted[rank]), (name, rank, second)
        first, second = seen["gather"]
        if rank == 1:
            assert torch.equal(first, torch.cat(xs)) and torch.equal(second, torch.cat(xs))
        else:
            assert first is None and second is None
        assert seen["route"] == (seen["communicator"], 2)
        assert seen["pair_route"] is seen["pair_communicator"]
    # rank 1 received turn 0 from rank 0; rank 0 received turn 1 from rank 1
    assert torch.equal(results[1]["received"][0], xs[0])
    assert torch.equal(results[0]["received"][0], xs[1] + 1)


def test_routes_are_remembered_per_axis_and_device_and_forgotten_at_close() -> None:
    with DeviceMesh(dp=1, tp=1).activate(WORLD, store=STORE) as ctx:
        x = torch.ones(3)
        assert ctx._routes == {}
        assert torch.equal(topo.all_reduce(x, "tp"), x)
        assert torch.equal(topo.all_reduce(x.double(), "tp", op="max"), x)
        assert torch.equal(topo.all_gather(x, ("dp", "tp")), x)
        # a reduction's route names the (dtype, op) its checks accepted
        assert ctx._routes == {
            ("tp", "cpu", torch.float32, "sum"): (None, 1),
            ("tp", "cpu", torch.float64, "max"): (None, 1),
            (("dp", "tp"), "cpu"): (None, 1),
        }
        # a list axis is unhashable: located on every call, never remembered
        assert torch.equal(topo.all_reduce(x, ["tp", "dp"]), x)
        assert torch.equal(topo.all_reduce(x, ["tp", "dp"]), x)
        assert len(ctx._routes) == 3
        # an op or dtype not accepted before is checked, with the route remembered
        with pytest.raises(topo.TopoTypeError, match="floating"):
            topo.all_reduce(x.long(), "tp", op="avg")
        with pytest.raises(topo.TopoValueError, match="op requires"):
            topo.all_reduce(x, "tp", op="mean")
        with pytest.raises(topo.TopoValueError, match="op requires"):
            topo.all_reduce(x, "tp", op=["sum"])  # type: ignore[arg-type]
    assert ctx._routes == {} and ctx._pair_routes == {}
    with pytest.raises(topo.NoActiveMeshError):
        topo.all_reduce(x, "tp")


def test_an_outer_activations_axis_is_not_remembered_in_the_inner_one() -> None:
    with DeviceMesh(tp=1, sp=1).activate(WORLD, store=STORE) as outer:
        x = torch.ones(2)
        with DeviceMesh(tp=1).activate(WORLD, store=STORE, name="inner") as inner:
            for _ in range(2):
                assert torch.equal(topo.all_reduce(x, "sp"), x)  # the outer activation's axis
                assert torch.equal(topo.all_reduce(x, "tp"), x)  # the inner one's
            # "sp" is the outer activation's: located on every call, remembered nowhere (the
            # inner activation could be entered over another stack)
            assert set(inner._routes) == {("tp", "cpu", torch.float32, "sum")}
            assert outer._routes == {}
        assert torch.equal(topo.all_reduce(x, "sp"), x)
        assert set(outer._routes) == {("sp", "cpu", torch.float32, "sum")}


def test_a_view_remembers_its_own_routes() -> None:
    def work() -> tuple[Any, ...]:
        ctx = topo.current()
        x = torch.full((2,), float(topo.axis_index("tp") + 1))
        with ctx.view(ctx.mesh.with_axes(ep=("dp", "tp"))) as view:
            by_ep = [topo.all_reduce(x, "ep") for _ in range(2)]
            by_tp = topo.all_reduce(x, "tp")
            view_routes = {key[0]: route for key, route in view._routes.items()}
        return by_ep, by_tp, view_routes, dict(ctx._routes)

    for by_ep, by_tp, view_routes, routes in topo.simulate(
        DeviceMesh(dp=1, tp=2), work, timeout=WAIT
    ):
        assert all(torch.equal(y, torch.full((2,), 3.0)) for y in [*by_ep, by_tp])
        assert set(view_routes) == {"ep", "tp"}
        assert routes == {}  # the view's calls remember nothing in the activation
        # the view shares the activation's communicator where the groups coincide
        assert view_routes["ep"][0] is view_routes["tp"][0]


def test_a_tensor_that_needs_its_gradient_takes_the_op_even_with_a_route() -> None:
    with DeviceMesh(tp=1).activate(WORLD, store=STORE):
        topo.all_reduce(torch.ones(2), "tp")  # remember the route
        w = torch.ones(2, requires_grad=True)
        y = topo.all_reduce(w, "tp")
        assert y.requires_grad and y.grad_fn is not None
        y.sum().backward()
        assert torch.equal(w.grad, torch.ones(2))
        with torch.no_grad():
            assert not topo.all_reduce(w, "tp").requires_grad

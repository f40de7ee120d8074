"""Per-rank random streams (``topo.rank_generator``) and collectives from a thread the user
starts (``ctx.run``), under ``topo.simulate`` (rank threads share torch's global generator)
and in a process world."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh, World

MESH = DeviceMesh(dp=2, tp=2)


def _draw(seed: int, axis: Any) -> list[float]:
    return torch.randn(3, generator=topo.rank_generator(seed, axis=axis)).tolist()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**40))
def test_streams_differ_by_rank_and_repeat_by_seed(seed: int) -> None:
    first = topo.simulate(MESH, _draw, seed, None)
    again = topo.simulate(MESH, _draw, seed, None)
    assert first == again  # reproducible, whatever the thread interleaving
    assert len({tuple(d) for d in first}) == MESH.size  # each rank its own stream
    other = topo.simulate(MESH, _draw, seed + 1, None)
    assert all(a != b for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("axis", "same"), [("tp", "dp"), ("dp", "tp"), (("dp", "tp"), None)])
def test_ranks_with_the_same_index_along_axis_share_a_stream(axis: Any, same: str | None) -> None:
    draws = topo.simulate(MESH, _draw, 7, axis)
    for rank, draw in enumerate(draws):
        for other, theirs in enumerate(draws):
            coords, their_coords = MESH.coords(rank), MESH.coords(other)
            along = (axis,) if isinstance(axis, str) else axis
            equal = all(coords[a] == their_coords[a] for a in along)
            assert (draw == theirs) == equal, (axis, rank, other)
    if same is not None:  # e.g. axis="tp": the dp replicas agree
        assert draws[MESH.rank_of(**{same: 0, axis: 1})] == draws[MESH.rank_of(**{same: 1, axis: 1})]


def test_the_global_generator_is_shared_by_simulated_ranks() -> None:
    # What rank_generator is for: torch.manual_seed in one rank thread moves the others' draws.
    barrier = threading.Barrier(MESH.size)

    def seeded() -> float:
        torch.manual_seed(0)
        barrier.wait(10)  # every rank has seeded; now all draw from the one global stream
        return float(torch.rand(1))

    draws = topo.simulate(MESH, seeded)
    assert len(set(draws)) == MESH.size  # four seeded ranks, four different "first" draws


def test_rank_generator_errors() -> None:
    with pytest.raises(topo.NoActiveMeshError, match="active mesh"):
        topo.rank_generator(0)
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=30):
        with pytest.raises(topo.TopoValueError, match="rank_generator seed"):
            topo.rank_generator(-1)
        with pytest.raises(topo.TopoTypeError, match="rank_generator seed"):
            topo.rank_generator(1.5)  # type: ignore[arg-type]
        with pytest.raises(topo.TopoTypeError, match="rank_generator device requires"):
            topo.rank_generator(0, device=0)  # type: ignore[arg-type]
        with pytest.raises(topo.TopoValueError, match="pp"):
            topo.rank_generator(0, axis="pp")
        g = topo.rank_generator(3, device=torch.device("cpu"))
        assert isinstance(g, torch.Generator) and g.device.type == "cpu"


def _from_helper_thread(x: float) -> tuple[float, str]:
    """A rank starts a thread of its own; it calls a collective through ctx.run."""
    ctx = topo.current()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            topo.all_reduce(torch.ones(1), "tp")
        except topo.NoActiveMeshError as error:
            box["bare"] = str(error)
        box["sum"] = float(ctx.run(topo.all_reduce, torch.tensor([x]), "tp"))

    helper = threading.Thread(target=work)
    helper.start()
    helper.join(30)
    assert not helper.is_alive()
    return box["sum"], box["bare"]


def test_ctx_run_gives_a_users_thread_the_activation() -> None:
    results = topo.simulate(MESH, _from_helper_thread, 1.0)
    for total, bare in results:
        assert total == 2.0  # the two tp ranks' 1.0
        assert "none is active in this thread" in bare


def test_ctx_run_after_close_and_in_a_process() -> None:
    world = World(rank=0, world_size=1, master_port=0)
    with DeviceMesh(tp=1).activate(world, timeout=30) as ctx:
        box: dict[str, Any] = {}
        helper = threading.Thread(
            target=lambda: box.update(y=ctx.run(topo.all_reduce, torch.ones(2), axis="tp"))
        )
        helper.start()
        helper.join(30)
        assert torch.equal(box["y"], torch.ones(2))
        assert topo.current() is ctx  # this thread's stack is untouched
    with pytest.raises(topo.TopoValueError, match="requires an open activation"):
        ctx.run(print)

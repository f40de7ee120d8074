"""``topo.ray``: Ray as a launcher, on a local Ray cluster of three nodes on this machine.

The pure parts (the placement group's bundles, the GPU choice) run without Ray processes; the
rest on one ``ray.cluster_utils.Cluster`` for the module (a head node of 4 CPUs and two nodes
of 2 CPUs, so that a 2-node placement is real): ``topo.ray.spawn`` against a reference
computed from every rank's input, ``MeshActors`` reuse without a second rendezvous, a killed
actor named by ``RankFailedError``, the RLHF example's bit-for-bit equality, and a placement
that follows the plan. The cluster is shut down at the end and no Ray process may outlive it.

Ray's workers import this module (and ``examples/rlhf_ray.py``) by name to run the functions
sent to them: the cluster's job puts ``tests/`` and ``examples/`` on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _procs import live_processes

import topo
import topo.ray
from topo.ray import MeshActors, gpu_device, ray_plan

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.multiprocess

WAIT = 60.0  # seconds: each activation's waits, and each call


# ----------------------------------------------------------------- pure: no Ray processes


def test_plan_puts_each_node_of_the_placement_in_one_bundle() -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    plan = ray_plan(mesh, ranks_per_node=2)
    assert plan.bundles == ({"CPU": 2.0}, {"CPU": 2.0})
    assert plan.strategy == "STRICT_SPREAD" and plan.num_nodes == 2
    assert plan.bundle_of_rank == (0, 0, 1, 1) and plan.local_ranks == (0, 1, 0, 1)
    assert plan.local_world_size == 2
    # tp stays inside a node, dp spans them: as the mesh's own placement says
    assert plan.placement.intra_node_axes == ("tp",) and plan.placement.inter_node_axes == ("dp",)
    for group in mesh.groups("tp"):
        assert len({plan.bundle_of_rank[r] for r in group}) == 1

    whole = ray_plan(mesh)  # default: the whole mesh on one node
    assert whole.bundles == ({"CPU": 4.0},) and whole.strategy == "STRICT_PACK"
    assert whole.bundle_of_rank == (0, 0, 0, 0) and whole.local_ranks == (0, 1, 2, 3)

    gpus = ray_plan(
        topo.DeviceMesh(pp=2, tp=4), 4, resources_per_rank={"CPU": 2, "memory": 1e9}, num_gpus=1
    )
    assert gpus.bundles[0] == {"CPU": 8.0, "memory": 4e9, "GPU": 4.0}
    assert gpus.actor_options(5) == {
        "num_cpus": 2.0,
        "num_gpus": 1.0,
        "memory": 1e9,
        "resources": {},
    }
    half = ray_plan(topo.DeviceMesh(tp=2), resources_per_rank={"CPU": 0}, num_gpus=0.5)
    assert half.bundles == ({"GPU": 1.0},)  # zero amounts leave the bundle (Ray refuses them)


def test_plan_refuses_wrong_arguments_at_the_call() -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    with pytest.raises(topo.TopoValueError, match="num_gpus"):
        ray_plan(mesh, resources_per_rank={"GPU": 1})
    with pytest.raises(topo.TopoValueError, match="divisor"):
        ray_plan(mesh, ranks_per_node=3)
    with pytest.raises(topo.TopoValueError, match="non-negative"):
        ray_plan(mesh, num_gpus=-1)
    with pytest.raises(topo.TopoTypeError, match="a number"):
        ray_plan(mesh, resources_per_rank={"CPU": "1"})  # type: ignore[dict-item]
    with pytest.raises(topo.TopoTypeError, match="dict"):
        ray_plan(mesh, resources_per_rank=[("CPU", 1)])  # type: ignore[arg-type]
    with pytest.raises(topo.TopoValueError, match="some resource"):
        ray_plan(mesh, resources_per_rank={"CPU": 0})
    with pytest.raises(topo.TopoTypeError, match="DeviceMesh"):
        ray_plan("dp=2")  # type: ignore[arg-type]


def test_gpu_device_is_the_position_of_rays_gpu_among_the_visible_ones() -> None:
    assert gpu_device(["3"], "3") == 0  # Ray's usual isolation: one visible GPU
    assert gpu_device([3], "1,3") == 1
    assert gpu_device(["2", "5"], " 5, 2 ") == 1  # the first of the actor's GPUs
    assert gpu_device([6], None) == 6 and gpu_device(["6"], "") == 6  # variable left unset
    assert gpu_device(["GPU-ab"], "GPU-cd,GPU-ab") == 1
    with pytest.raises(topo.TopoValueError, match="num_gpus > 0"):
        gpu_device([], "0")
    with pytest.raises(topo.TopoValueError, match="does not list it"):
        gpu_device([4], "0,1")
    with pytest.raises(topo.TopoValueError, match="numeric"):
        gpu_device(["GPU-ab"], None)
    with pytest.raises(topo.TopoTypeError):
        gpu_device("0", "0")  # type: ignore[arg-type]


def test_doctests_of_the_pure_modules() -> None:
    import doctest

    import topo.ray.devices
    import topo.ray.placement

    for module in (topo.ray.placement, topo.ray.devices):
        result = doctest.testmod(module, extraglobs={"DeviceMesh": topo.DeviceMesh})
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_the_blame_follows_the_chain_of_waits_to_the_cause() -> None:
    from topo.ray.collect import _raise_cause

    # rank 0 waited for rank 2 in a dp call; rank 2 waited for rank 3 in a tp call
    errors = {
        0: ("CommunicationTimeout: all_reduce on dp", "trace 0", [2]),
        2: ("CommunicationTimeout: all_reduce on tp", "trace 2", [3]),
    }
    with pytest.raises(topo.RankFailedError) as caught:
        _raise_cause(topo.DeviceMesh(dp=2, tp=2), "MeshActors.run(step)", errors, {})
    assert caught.value.rank == 3
    assert str(caught.value).startswith(
        "rank 3 of DeviceMesh(dp=2, tp=2) is the cause in MeshActors.run(step), as rank 2 "
        "found: CommunicationTimeout: all_reduce on tp\n(rank 3: it raised nothing)"
    )


def test_an_unreachable_actor_is_not_called_dead() -> None:
    from topo.ray.collect import _raise_cause

    with pytest.raises(topo.RankFailedError) as caught:
        _raise_cause(topo.DeviceMesh(tp=2), "MeshActors.run(step)", {},
                     {1: "unreachable, not known to be dead: ActorUnavailableError"})  # fmt: skip
    assert caught.value.rank == 1
    assert str(caught.value).startswith(
        "rank 1 of DeviceMesh(tp=2) could not be reached in MeshActors.run(step): its Ray "
        "actor does not answer — unreachable, not known to be dead"
    )


def test_a_close_that_times_out_says_what_it_waited_for() -> None:
    import queue
    from concurrent.futures import Future
    from types import SimpleNamespace

    from topo.ray.rank import RankActor

    actor = RankActor(topo.DeviceMesh(tp=2), 1)
    # a rank whose function still runs: its session never finishes
    actor._session = SimpleNamespace(jobs=queue.SimpleQueue(), finished=Future())  # type: ignore[assignment]
    reply = actor.close(0.1)
    assert reply[0] == "error"
    assert reply[1] == (
        "RendezvousTimeout: rank 1 requires its function to return and every rank to leave "
        "DeviceMesh(tp=2) within 0.1 s to close, but it is still running or waiting for the "
        "others; collect every submitted call before close(), or give close() a longer timeout"
    )


def test_rank_state_outside_a_rank_says_where_it_works() -> None:
    with pytest.raises(topo.TopoValueError, match=r"inside a topo\.ray rank"):
        topo.ray.rank_state()


@pytest.mark.parametrize("name", sorted(topo.ray.__all__))
def test_every_topo_ray_name_has_an_example_and_is_in_the_docs(name: str) -> None:
    import inspect
    import re

    value = getattr(topo.ray, name)
    assert "Example::" in (inspect.getdoc(value) or ""), f"topo.ray.{name} needs an Example::"
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    inline = re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = "\n".join(fenced + inline)  # the docs' code, as tests/test_public_api.py reads it
    assert re.search(rf"(?<![\w]){re.escape(name)}(?!\w)", code), (
        f"topo.ray.{name} appears in the code of none of docs/*.md"
    )


def test_topo_ray_imports_without_ray_and_its_first_use_names_the_extra(
    python_subprocess: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "import topo, topo.ray\n"
        "assert 'torch' not in sys.modules\n"
        "for use in (lambda: topo.ray.spawn(print, topo.DeviceMesh(tp=2)),\n"
        "            lambda: topo.ray.MeshActors(topo.DeviceMesh(tp=2))):\n"
        "    try:\n"
        "        use()\n"
        "    except topo.BackendUnavailableError as error:\n"
        "        print(error)\n"
    )
    result = python_subprocess(code, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("topo.ray requires Ray; pip install 'topo[ray]'" in line for line in lines)


# ----------------------------------------------------------------- on a local Ray cluster

try:
    import ray
except ImportError:  # the pure tests above still run; CI installs Ray with the test extra
    ray = None


def _descendants() -> dict[int, str]:
    """Every live descendant of this process: pid → command line."""
    table = live_processes()
    parent = {pid: ppid for pid, (ppid, _) in table.items()}
    mine = {os.getpid()}
    grew = True
    while grew:
        found = {pid for pid, ppid in parent.items() if ppid in mine} - mine
        grew = bool(found)
        mine |= found
    mine.discard(os.getpid())
    return {pid: table[pid][1] for pid in mine}


def _ray_processes() -> dict[int, str]:
    names = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard", "log_monitor")
    return {pid: cmd for pid, cmd in _descendants().items() if any(n in cmd for n in names)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Ray cluster of three nodes on this machine (head: 4 CPUs; two more of 2 CPUs), its
    job's workers able to import this module and the examples; shut down afterwards, and
    checked that no Ray process outlives it."""
    if ray is None:
        pytest.skip("needs Ray: pip install 'topo[ray]'")
    from ray.cluster_utils import Cluster

    paths = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=2)
        nodes.wait_for_nodes()
        ray.init(
            address=nodes.address,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}},
            log_to_driver=False,
        )
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() == {}, "Ray processes outlived the cluster"


# The functions the ranks run (Ray's workers import them from this module).


def reduce_and_gather(
    inputs: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    ctx = topo.current()
    mine = inputs[ctx.rank]
    world = ctx.world
    where = {
        "local_rank": world.local_rank,
        "local_world_size": world.local_world_size,
        "secret": ctx.coordinator.store.sealed,
        "env_rank": os.environ["RANK"],
    }
    return topo.all_reduce(mine, axis="tp"), topo.all_gather(mine, axis="dp", dim=0), where


def fail_on_rank_1() -> int:
    if topo.current().rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return 0


def store_round_trips() -> tuple[int, int, int, float]:
    """(store operations before, after an all-reduce over each axis, calls so far, sum)."""
    ctx = topo.current()
    store = ctx.coordinator.store
    before = store.ops
    b = torch.ones(2)
    for axis in ctx.mesh.axis_names:
        b = topo.all_reduce(b, axis=axis)
    state = topo.ray.rank_state()
    state["calls"] = state.get("calls", 0) + 1
    return before, store.ops, state["calls"], float(b.sum())


def rank() -> int:
    return topo.current().rank


def sleep_on_rank_1_else_reduce() -> float:
    if topo.current().rank == 1:
        time.sleep(WAIT)
    return float(topo.all_reduce(torch.ones(1), axis="tp"))


def node_and_world() -> tuple[str, int, int, float, float]:
    ctx = topo.current()
    node = ray.get_runtime_context().get_node_id()
    across = topo.all_reduce(torch.tensor([float(ctx.rank)]), axis="dp")  # spans the nodes
    inside = topo.all_reduce(torch.tensor([float(ctx.rank)]), axis="tp")
    return node, ctx.world.local_rank, ctx.world.local_world_size, float(across), float(inside)


def test_spawn_matches_a_reference_from_every_ranks_input(cluster: Any) -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randn(3, generator=generator) for _ in range(mesh.size)]
    results = topo.ray.spawn(reduce_and_gather, mesh, inputs, timeout=120, activation_timeout=WAIT)
    assert len(results) == mesh.size
    for rank, (reduced, gathered, where) in enumerate(results):
        tp = mesh.group("tp", rank)
        dp = mesh.group("dp", rank)
        expected = inputs[tp[0]].clone()
        for other in tp[1:]:
            expected += inputs[other]
        torch.testing.assert_close(reduced, expected)
        torch.testing.assert_close(gathered, torch.cat([inputs[r] for r in dp]), rtol=0, atol=0)
        assert where == {
            "local_rank": rank,
            "local_world_size": 4,
            "secret": True,
            "env_rank": str(rank),
        }


def test_spawn_names_the_rank_that_raised_with_its_traceback(cluster: Any) -> None:
    with pytest.raises(topo.RankFailedError) as caught:
        topo.ray.spawn(fail_on_rank_1, topo.DeviceMesh(tp=2), timeout=120, activation_timeout=WAIT)
    assert caught.value.rank == 1
    assert "rank 1 of DeviceMesh(tp=2) raised ValueError: rank 1 fails on purpose" in str(
        caught.value
    )
    assert "fail_on_rank_1" in caught.value.remote_traceback


def test_mesh_actors_keep_their_activation_across_calls(cluster: Any) -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    with MeshActors(mesh, activation_timeout=WAIT) as ranks:
        joined = [facts["store_ops"] for facts in ranks.facts]
        first = ranks.run(store_round_trips, timeout=WAIT)
        second = ranks.run(store_round_trips, timeout=WAIT)
        third = ranks.submit(store_round_trips).result(WAIT)
    for rank in range(mesh.size):
        assert first[rank][0] == joined[rank] > 0  # the join's round trips, nothing since
        assert first[rank][2] == 1 and second[rank][2] == 2 and third[rank][2] == 3
        assert first[rank][3] == second[rank][3] == 8.0
        # the first call made its communicators; the later ones reach the store no more
        assert second[rank][1] == second[rank][0] == first[rank][1]
        assert third[rank][1] == first[rank][1]
    with pytest.raises(topo.TopoValueError, match="closed"):
        ranks.run(store_round_trips)


def test_a_killed_actor_is_named_and_the_others_do_not_hang(cluster: Any) -> None:
    ranks = MeshActors(topo.DeviceMesh(tp=2), activation_timeout=WAIT)
    try:
        assert ranks.run(rank, timeout=WAIT) == [0, 1]  # alive
        pending = ranks.submit(sleep_on_rank_1_else_reduce)  # rank 0 waits in all_reduce
        time.sleep(1.0)
        start = time.monotonic()
        ray.kill(ranks.handles[1])
        with pytest.raises(topo.RankFailedError) as caught:
            pending.result(WAIT)
        assert time.monotonic() - start < WAIT / 2  # not the activation's timeout
        assert caught.value.rank == 1
        assert "rank 1 of DeviceMesh(tp=2) died" in str(caught.value)
        assert "killed by `ray.kill`" in str(caught.value)
        # rank 0 was waiting on rank 1: it is ended too, not left in its collective
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(ranks.handles[0].ping.remote(), timeout=WAIT)
        with pytest.raises(topo.RankFailedError, match="stopped after a failure") as again:
            ranks.run(store_round_trips)
        assert again.value.rank == 1
    finally:
        ranks.close()


def test_an_actor_killed_between_calls_fails_the_next_call(cluster: Any) -> None:
    with MeshActors(topo.DeviceMesh(tp=2), activation_timeout=WAIT) as ranks:
        ranks.run(store_round_trips, timeout=WAIT)
        ray.kill(ranks.handles[0])  # the store's host
        start = time.monotonic()
        with pytest.raises(topo.RankFailedError, match=r"killed by `ray\.kill`") as caught:
            ranks.run(store_round_trips, timeout=WAIT)
        assert caught.value.rank == 0 and time.monotonic() - start < WAIT / 2


def test_rlhf_example_keeps_inference_weights_equal_to_the_trainers(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # the workers have it on their path
    import rlhf_ray

    summary = rlhf_ray.main(steps=2, verbose=False)
    assert summary["equal"]
    for mode in ("packed", "per_tensor"):
        assert summary[mode]["steps"] == 2 and summary[mode]["equal"]
        assert (
            summary[mode]["nbytes"]
            == 2 * rlhf_ray.LAYERS * (rlhf_ray.WIDTH + 1) * rlhf_ray.WIDTH * 4
        )
    assert summary["packed"]["calls"] == 2  # one bucket per step
    assert summary["per_tensor"]["calls"] == 2 * 2 * rlhf_ray.LAYERS  # one per tensor


def test_two_node_placement_follows_the_plan(cluster: Any) -> None:
    mesh = topo.DeviceMesh(dp=2, tp=2)
    with MeshActors(mesh, ranks_per_node=2, activation_timeout=WAIT) as ranks:
        assert ranks.plan.strategy == "STRICT_SPREAD"
        nodes = ranks.node_ids
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
        assert [w.local_rank for w in ranks.worlds] == [0, 1, 0, 1]
        assert {w.master_addr for w in ranks.worlds} == {ray.util.get_node_ip_address()}
        found = ranks.run(node_and_world, timeout=WAIT)
    for rank, (node, local_rank, local_world_size, across, inside) in enumerate(found):
        assert node == nodes[rank] and (local_rank, local_world_size) == (rank % 2, 2)
        assert across == sum(mesh.group("dp", rank)) and inside == sum(mesh.group("tp", rank))


def test_a_plan_the_cluster_cannot_place_fails_in_time_naming_the_bundles(cluster: Any) -> None:
    start = time.monotonic()
    with (
        pytest.warns(RuntimeWarning, match=r"needs 4 node\(s\) that each hold \{'CPU': 1.0\}") as said,
        pytest.raises(topo.RendezvousTimeout, match="STRICT_SPREAD") as caught,
    ):
        MeshActors(topo.DeviceMesh(dp=2, tp=2), ranks_per_node=1, start_timeout=3)
    assert time.monotonic() - start < 20
    assert "4 bundle(s)" in str(caught.value) and "3 live node(s)" in str(caught.value)
    assert "but 3 of the live nodes do" in str(said[0].message)  # said at once, before the wait

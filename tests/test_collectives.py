"""Collectives through topo.spawn (gloo on CPU), checked against references the parent computes.

Each mesh is spawned once (module-scoped fixture); one spawned function runs every case on
every axis and returns all results. The parent rebuilds every rank's inputs and computes what
each rank should have received from the mesh's pure rank math (``mesh.group`` and
``mesh.axis_index``), never by calling topo collectives.
"""

from __future__ import annotations

import os
from typing import Any

import _lazy_view_fns as lazy
import _spawn_fns as fns
import pytest
import torch

import topo
from topo import DeviceMesh

pytestmark = pytest.mark.multiprocess

MESHES: dict[str, tuple[DeviceMesh, list[Any], list[str]]] = {
    "dp2-tp2": (
        DeviceMesh(dp=2, tp=2),
        ["tp", "dp", ("dp", "tp"), ("tp", "dp")],
        ["errors", "coordinator", "nested", "side_by_side", "threads", "reactivate", "store_ops"],
    ),
    "dp2-pp2-tp2": (
        DeviceMesh(dp=2, pp=2, tp=2),
        ["tp", "pp", "dp", ("dp", "tp"), ("pp", "tp"), ("dp", "pp", "tp")],
        ["store_ops"],
    ),
    "dp2-pp1-tp2": (
        DeviceMesh(dp=2, pp=1, tp=2),
        ["pp", ("pp", "tp"), ("dp", "pp"), "dp"],
        [],
    ),
}

_REPORTS: dict[str, list[dict[str, Any]] | BaseException] = {}


def _report(name: str, timeout: float) -> list[dict[str, Any]]:
    """Spawn mesh ``name`` once per session (shared by the fixtures and the store-ops test);
    a failed spawn is remembered too, so that it costs its time once."""
    if name not in _REPORTS:
        mesh, axes, extras = MESHES[name]
        try:
            _REPORTS[name] = topo.spawn(fns.mesh_main, mesh, axes, extras, timeout=timeout)
        except Exception as error:
            _REPORTS[name] = error
    report = _REPORTS[name]
    if isinstance(report, BaseException):
        raise report
    return report


@pytest.fixture(scope="module", params=list(MESHES))
def spawned(
    request: pytest.FixtureRequest, spawn_timeout: int
) -> tuple[DeviceMesh, list[Any], list[dict[str, Any]]]:
    mesh, axes, _ = MESHES[request.param]
    return mesh, axes, _report(request.param, spawn_timeout)


@pytest.fixture(scope="module")
def dp2_tp2(spawn_timeout: int) -> list[dict[str, Any]]:
    return _report("dp2-tp2", spawn_timeout)


# ----------------------------------------------------------------------------- references


def _reduce(tensors: list[torch.Tensor], op: str) -> torch.Tensor:
    stacked = torch.stack(tensors)
    if op == "sum":
        return stacked.sum(0, dtype=stacked.dtype)
    if op == "avg":
        return stacked.sum(0, dtype=stacked.dtype) / len(tensors)
    if op == "max":
        return stacked.amax(0)
    if op == "min":
        return stacked.amin(0)
    assert op == "prod"
    return stacked.prod(0, dtype=stacked.dtype)


def reference(
    mesh: DeviceMesh, axis: Any, rank: int, collective: str, name: str, kw: dict[str, Any]
) -> Any:
    """What ``rank`` should receive, from every rank's inputs and the pure rank math."""
    group = mesh.group(axis, rank)
    index = mesh.axis_index(axis, rank)
    n = len(group)
    assert group[index] == rank
    xs = [fns.rank_inputs(g)[name] for g in group]
    if collective == "all_reduce":
        return _reduce(xs, kw["op"])
    if collective == "all_gather":
        return torch.cat(xs, kw["dim"])
    if collective == "reduce_scatter":
        return _reduce(xs, kw["op"]).chunk(n, kw["dim"])[index]
    if collective == "broadcast":
        return xs[kw["src"]]
    if collective == "scatter":
        return xs[kw["src"]].chunk(n, kw["dim"])[index]
    if collective == "gather":
        return torch.cat(xs, kw["dim"]) if index == kw["dst"] else None
    if collective == "all_to_all":
        return torch.cat([x.chunk(n, kw["split_dim"])[index] for x in xs], kw["concat_dim"])
    if collective == "ppermute":
        sources = [s for s, d in kw["perm"] if d == index]
        return xs[sources[0]] if sources else torch.zeros_like(xs[index])
    if collective == "shift":
        src = index - kw["offset"]
        if kw["wrap"]:
            src %= n
        return xs[src] if 0 <= src < n else torch.zeros_like(xs[index])
    raise AssertionError(collective)


def assert_same(actual: Any, expected: Any, approx: bool, where: str) -> None:
    if expected is None:
        assert actual is None, where
        return
    assert isinstance(actual, torch.Tensor), f"{where}: got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    if approx:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=where)
    else:
        assert torch.equal(actual, expected), f"{where}:\n{actual}\n!=\n{expected}"


def _approx(collective: str, kw: dict[str, Any], dtype: torch.dtype) -> bool:
    """Float sums, averages and products may be rounded in another order than ours."""
    return (
        collective in ("all_reduce", "reduce_scatter")
        and kw["op"] in ("sum", "avg", "prod")
        and dtype.is_floating_point
    )


COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "scatter",
    "gather",
    "all_to_all",
    "ppermute",
    "shift",
]


# ----------------------------------------------------------------------------- the suite


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_collective_matches_reference(spawned: Any, collective: str) -> None:
    mesh, axes, reports = spawned
    checked = 0
    for rank, report in enumerate(reports):
        assert report["rank"] == rank
        results = report["results"]
        for axis in axes:
            n = mesh.axis_size(axis)
            for key, coll, name, kw in fns.cases(n):
                if coll != collective:
                    continue
                expected = reference(mesh, axis, rank, coll, name, kw)
                approx = _approx(coll, kw, fns.rank_inputs(0)[name].dtype)
                assert_same(results[(axis, key)], expected, approx, f"rank {rank} {axis} {key}")
                checked += 1
    assert checked >= len(reports) * len(axes) * 4


def test_axis_index_and_size(spawned: Any) -> None:
    mesh, axes, reports = spawned
    for rank, report in enumerate(reports):
        for axis in axes:
            assert report["results"][(axis, "axis_size")] == mesh.axis_size(axis)
            assert report["results"][(axis, "axis_index")] == mesh.axis_index(axis, rank)


def test_objects(spawned: Any) -> None:
    mesh, axes, reports = spawned
    for rank, report in enumerate(reports):
        for axis in axes:
            group = mesh.group(axis, rank)
            got = report["results"]
            assert got[(axis, "broadcast_object")] == fns.rank_object(group[-1])
            assert got[(axis, "all_gather_object")] == [fns.rank_object(g) for g in group]


def test_send_recv(spawned: Any) -> None:
    mesh, axes, reports = spawned
    checked = 0
    for rank, report in enumerate(reports):
        for axis in axes:
            group = mesh.group(axis, rank)
            n, me = len(group), mesh.axis_index(axis, rank)
            got = report["results"]
            expected: dict[str, torch.Tensor] = {}
            if n >= 2 and me == 0:
                expected["recv/c64"] = fns.rank_inputs(group[n - 1])["c64"]
            if n >= 2 and me == n - 1:
                expected["recv/f32"] = fns.rank_inputs(group[0])["f32"]
            if n >= 3 and me == 2:
                expected["recv/nc"] = fns.rank_inputs(group[1])["nc"]
            for key in ("recv/c64", "recv/f32", "recv/nc"):
                if key in expected:
                    assert_same(got[(axis, key)], expected[key], False, f"rank {rank} {axis} {key}")
                    if key != "recv/f32":  # received into out=: out itself is returned
                        assert got[(axis, f"{key} is out")] is True, (rank, axis, key)
                    checked += 1
                else:
                    assert (axis, key) not in got
    assert checked > 0 or all(mesh.axis_size(a) == 1 for a in axes)


def test_barriers(spawned: Any) -> None:
    _, axes, reports = spawned
    for report in reports:
        for axis in axes:
            assert report["results"][(axis, "barrier_marks")] is True


def test_inputs_not_mutated(spawned: Any) -> None:
    _, _, reports = spawned
    for rank, report in enumerate(reports):
        fresh = fns.rank_inputs(rank)
        after = report["inputs_after"]
        assert after.keys() == fresh.keys()
        for name in fresh:
            assert after[name].dtype == fresh[name].dtype
            assert torch.equal(after[name], fresh[name]), f"rank {rank} input {name} changed"
        assert not after["nc"].is_contiguous()  # the non-contiguous input really was one


def test_ranks_ran_in_separate_processes(spawned: Any) -> None:
    mesh, _, reports = spawned
    assert len({r["pid"] for r in reports}) == mesh.size
    assert [r["world"].rank for r in reports] == list(range(mesh.size))
    assert {r["world"].world_size for r in reports} == {mesh.size}
    assert os.getpid() not in {r["pid"] for r in reports}


def test_size_one_axis_is_in_the_suite() -> None:
    mesh, axes, _ = MESHES["dp2-pp1-tp2"]
    assert mesh.axis_size("pp") == 1
    assert "pp" in axes and ("pp", "tp") in axes


# ----------------------------------------------------------------------------- contexts


def _f32(rank: int) -> torch.Tensor:
    return fns.rank_inputs(rank)["f32"]


def test_errors_that_need_a_real_group(dp2_tp2: list[dict[str, Any]]) -> None:
    mesh = MESHES["dp2-tp2"][0]
    for rank, report in enumerate(dp2_tp2):
        errors = report["errors"]
        kind, message = errors["reduce_scatter_uneven"]
        assert kind == "TopoValueError"
        assert "divisible by the size 2 of axis 'tp'" in message and "x.shape[0] = 3" in message
        kind, message = errors["scatter_uneven"]
        assert kind == "TopoValueError" and "x.shape[1] = 3" in message
        kind, message = errors["all_to_all_uneven"]
        assert kind == "TopoValueError" and "axis 'dp'" in message
        kind, message = errors["broadcast_src_range"]
        assert kind == "TopoValueError"
        assert "0 <= src < 2" in message and "not a global rank" in message and "got 2" in message
        kind, message = errors["gather_dst_range"]
        assert kind == "TopoValueError" and "0 <= dst < 4" in message
        kind, message = errors["scatter_src_negative"]
        assert kind == "TopoValueError" and "got -1" in message
        kind, message = errors["broadcast_src_bool"]
        assert kind == "TopoTypeError" and "bool" in message
        for name in ("ppermute_duplicate_dst", "ppermute_duplicate_src"):
            kind, message = errors[name]
            assert kind == "TopoValueError" and "at most once" in message
        kind, message = errors["ppermute_range"]
        assert kind == "TopoValueError" and "perm dst" in message and "got 2" in message
        for name in ("send_self", "recv_self"):
            kind, message = errors[name]
            assert kind == "TopoValueError" and "own" in message
        kind, message = errors["unknown_axis"]
        assert kind == "TopoValueError" and "'ep'" in message
        assert "'dp'" in message and "'tp'" in message
        # the context is still usable: the errors were raised before any communication
        group = mesh.group("tp", rank)
        assert torch.equal(report["after_errors"], sum(_f32(g) for g in group))


def test_coordinator_messages(dp2_tp2: list[dict[str, Any]]) -> None:
    for rank, report in enumerate(dp2_tp2):
        got = report["coordinator"]
        assert got["is_master"] == (rank == 0)
        assert got["is_local_master"] == (rank == 0)  # one node: local rank == rank
        assert got["bcast_all"] == b"from-2"
        if rank in (1, 3):
            assert got["bcast_13"] == b"from-3"
            assert got["gather_13"] == [{"r": 1}, {"r": 3}]
        else:
            assert "bcast_13" not in got
        assert got["gather_all"] == [["rank", r, "x" * r] for r in range(4)]
        for i in range(3):
            assert got[f"bcast_round{i}"] == bytes([i, i])
        assert "src requires a rank among [0, 1, 2, 3], but got 7" in got["bad_src"]


def test_nested_contexts(dp2_tp2: list[dict[str, Any]]) -> None:
    mesh = MESHES["dp2-tp2"][0]
    everyone = sum(_f32(r) for r in range(4))
    for rank, report in enumerate(dp2_tp2):
        got = report["nested"]
        assert got["depth"] == 2 and got["current_is_inner"]
        assert (got["tp_size"], got["tp_index"]) == (4, rank)  # innermost mesh with tp wins
        assert (got["dp_size"], got["dp_index"]) == (2, mesh.axis_index("dp", rank))
        assert torch.equal(got["tp_sum"], everyone)
        dp_sum = sum(_f32(g) for g in mesh.group("dp", rank))
        assert torch.equal(got["dp_sum"], dp_sum)
        assert got["depth2"] == 3
        assert torch.equal(got["ab_gather"], torch.cat([_f32(r) for r in range(4)]))
        b_group = DeviceMesh(a=2, b=2).group("b", rank)
        assert torch.equal(got["b_gather"], torch.cat([_f32(g) for g in b_group]))
        assert got["tp_size2"] == 4
        assert torch.equal(got["dp_sum2"], dp_sum)
        for name in ("'zz'", "'a'", "'b'", "'dp'", "'tp'"):
            assert name in got["unknown"]
        assert got["depth_after_ab"] == 2
        assert "closed" in got["inner_repr"]
        assert got["depth_after"] == 1 and got["current_is_outer"]
        assert got["tp_size_after"] == 2
        assert torch.equal(got["tp_sum_after"], sum(_f32(g) for g in mesh.group("tp", rank)))


def test_two_meshes_side_by_side(dp2_tp2: list[dict[str, Any]]) -> None:
    mesh = MESHES["dp2-tp2"][0]
    grid = DeviceMesh(row=2, col=2)
    for rank, report in enumerate(dp2_tp2):
        got = report["side_by_side"]
        assert got["depth"] == 3
        assert torch.equal(got["xfer1"], sum(_f32(r) for r in range(4)))
        assert torch.equal(got["col"], torch.cat([_f32(g) for g in grid.group("col", rank)]))
        row = torch.stack([_f32(g) for g in grid.group("row", rank)]).amax(0)
        assert torch.equal(got["row"], row)
        assert torch.equal(got["xfer2"], _f32(3))
        assert torch.equal(got["tp"], sum(_f32(g) for g in mesh.group("tp", rank)))


def test_contexts_in_two_threads(dp2_tp2: list[dict[str, Any]]) -> None:
    mesh = DeviceMesh(dp=2, tp=2)
    for rank, report in enumerate(dp2_tp2):
        got = report["threads"]
        assert got["alive"] == [False, False]
        for side in ("a", "b"):
            assert "error" not in got[side], got[side]["error"]
            assert got[side]["before"] == 0  # a new thread does not see the spawned context
            assert got[side]["after"] == 0
            assert got[side]["current_is_own"]
        assert got["a"]["inside"] == [DeviceMesh(dp=2, tp=2)]
        assert got["b"]["inside"] == [DeviceMesh(all4=4)]
        tp_group = mesh.group("tp", rank)
        for i, total in enumerate(got["a"]["sums"]):
            assert torch.equal(total, sum(_f32(g) + i for g in tp_group))
        for i, total in enumerate(got["b"]["sums"]):
            assert torch.equal(total, sum(_f32(r) * 10 + i for r in range(4)))
        assert torch.equal(got["a"]["gather"], torch.cat([_f32(g) for g in tp_group]))
        assert torch.equal(got["b"]["gather"], torch.cat([_f32(r) * 10 for r in range(4)]))
        # the spawning thread kept exactly its own context throughout
        assert got["main_during"] == [True]
        assert got["main_after"] == [True]


def test_reactivation_does_not_pile_up_store_keys(dp2_tp2: list[dict[str, Any]]) -> None:
    mesh = MESHES["dp2-tp2"][0]
    for rank, report in enumerate(dp2_tp2):
        got = report["reactivate"]
        keys = got["keys"]
        assert len(keys) == 6
        # a few keys stay (the join counter, the last close round) but they do not grow
        assert keys[1:] == [keys[1]] * 5, keys
        assert max(keys) <= 8, keys
        # the same work each time: with spawn's secret, whichever rank arrives last at a
        # barrier checks every arrival mark (a few more operations), so the count varies a
        # little with arrival order, but it does not grow
        assert max(got["ops"]) - min(got["ops"]) <= 8, got["ops"]
        for i in range(6):
            expected_sum = sum(_f32(g) + i for g in mesh.group("tp", rank))
            expected_gather = torch.cat([_f32(g) + i for g in mesh.group("dp", rank)])
            assert torch.equal(got["sums"][2 * i], expected_sum)
            assert torch.equal(got["sums"][2 * i + 1], expected_gather)


def test_store_ops_do_not_grow_with_world_size(spawn_timeout: int) -> None:
    small = sorted(r["store_ops"] for r in _report("dp2-tp2", spawn_timeout))
    large = sorted(r["store_ops"] for r in _report("dp2-pp2-tp2", spawn_timeout))
    # activation + one collective over tp (size 2 in both meshes): the same cost per rank
    assert set(small) == set(large), (small, large)
    assert max(large) < 40


#: Dtypes off dim 0 gathers must move bit-exact: one torch.cat has kernels for, and newer ones
#: it has none for on CPU (those take a copy of a permuted view).
_GATHER_DTYPES = [torch.float32, torch.bool, torch.complex64] + [
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn_x2")
    if hasattr(torch, name)
]


def _gather_input(index: int, dtype: torch.dtype) -> torch.Tensor:
    """A (3, 4) tensor of ``dtype`` from distinct bytes per index (no NaN bit patterns: each
    byte is below 0x7F; 0 or 1 for bool)."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.arange(12 * size, dtype=torch.uint8) + 40 * index
    raw = raw % 2 if dtype == torch.bool else raw % 0x7F
    return raw.reshape(3, 4 * size).view(dtype)


def _gathers_off_dim_0(dtype: torch.dtype) -> dict[str, list[list[int]]]:
    x = _gather_input(topo.axis_index("tp"), dtype)
    out = torch.empty(8, 3, dtype=dtype).t()  # the result's shape, not contiguous
    results = {
        "all_gather": topo.all_gather(x, "tp", dim=1),
        "all_gather out=": topo.all_gather(x, "tp", dim=1, out=out),
        "gather": topo.gather(x, "tp", dst=0, dim=1),
    }
    assert results["all_gather out="] is out
    return {
        k: v.contiguous().view(torch.uint8).tolist() for k, v in results.items() if v is not None
    }


@pytest.mark.parametrize("dtype", _GATHER_DTYPES, ids=str)
def test_gathers_off_dim_0_move_every_dtype_bit_exact(dtype: torch.dtype) -> None:
    expected = torch.cat([_gather_input(i, dtype).view(torch.uint8) for i in range(2)], 1)
    for rank, got in enumerate(topo.simulate(DeviceMesh(tp=2), _gathers_off_dim_0, dtype)):
        assert got["all_gather"] == expected.tolist(), rank
        assert got["all_gather out="] == expected.tolist(), rank
        assert ("gather" in got) == (rank == 0) and got.get("gather", expected.tolist()) == (
            expected.tolist()
        ), rank


def test_recv_into_a_conj_view_and_under_autograd(spawn_timeout: int) -> None:
    """gloo would move a ``conj()`` view's raw bytes (or refuse it after the sender has gone
    ahead); recv fills it through a copy. A receive straight into a buffer bumps its version,
    so a graph that saved the buffer refuses its changed data at backward."""
    reports = topo.spawn(fns.recv_into_views, DeviceMesh(pp=2), timeout=spawn_timeout)
    assert reports[0] == {}
    assert reports[1] == {
        "conj is out": True,
        "conj value": True,
        "base": True,
        "version bumped": True,
        "buf": [8.0, 8.0, 8.0],
        "backward refused": True,
    }


def test_out_writes_bump_the_version_on_gloo_and_threads(spawn_timeout: int) -> None:
    """A communicator writing into ``out`` is an in-place op autograd cannot see: topo moves
    ``out``'s version counter itself, so a graph that saved ``out`` refuses it at backward (a
    silently wrong gradient otherwise), on gloo processes and on simulate's threads alike."""
    every = {name: [True, True] for name in (
        "all_reduce in place", "all_reduce", "broadcast in place", "broadcast", "all_gather",
        "reduce_scatter",
    )}  # fmt: skip
    assert topo.spawn(fns.out_writes_bump_versions, DeviceMesh(tp=2), timeout=spawn_timeout) == [
        every,
        every,
    ]
    assert topo.simulate(DeviceMesh(tp=2), fns.out_writes_bump_versions) == [every, every]


def test_the_version_bump_takes_torch_2_4s_one_tensor_binding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch 2.4's ``_increment_version`` took one tensor (2.5 made it take an iterable), and
    refused a tensor made under inference mode; topo's bump asks which it has."""
    from topo.collectives import _common

    real = torch._C._increment_version

    def one_tensor(tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise RuntimeError("increment_version expect a Tensor as input")
        if tensor.is_inference():
            raise RuntimeError("Inference tensors do not track version counter.")
        real((tensor,))

    monkeypatch.setattr(torch._C, "_increment_version", one_tensor)
    bump = _common._version_bumper()
    x = torch.zeros(2)
    with torch.inference_mode():
        frozen = torch.zeros(2)
    version = x._version
    bump((x, frozen))
    assert x._version == version + 1
    monkeypatch.setattr(torch._C, "_increment_version", real)
    assert _common._version_bumper() is real


def _lazy_view_expectations(me: int) -> dict[str, Any]:
    """What index ``me`` of 2 must read back from :func:`lazy.lazy_views`, computed from both
    ranks' plain inputs."""
    z = [lazy.complex_input(r) for r in range(2)]
    c = [t.conj().resolve_conj() for t in z]
    expected: dict[str, Any] = {
        "all_gather": torch.cat(c),
        "all_gather dim 1": torch.cat([t.reshape(2, 2) for t in c], 1),
        "all_gather out=": torch.cat(z),
        "broadcast": c[1],
        "broadcast out=": z[0],
        "broadcast in place": c[1],
        "all_to_all": torch.cat([t.chunk(2)[me] for t in c]),
        "all_gatherv": torch.cat([c[0][:1], c[1][:2]]),
        "ppermute": c[1 - me],
        "shift": c[1 - me],
        "scatter": c[1].chunk(2)[me],
        "gather": torch.cat(c) if me == 0 else None,
        "all_reduce sum": torch.tensor([-7.0]),
        "all_reduce max": torch.tensor([-3.0]),
        "all_reduce prod in place": torch.tensor([12.0]),
        "all_reduce out=": torch.tensor([3.0]),
        "reduce_scatter out=": torch.tensor([3.0 + 2 * me]),
        "reduce_scatter": torch.tensor([-3.0 - 2 * me]),
        "tensor_dict c": c[1],
        "tensor_dict n": torch.tensor([-4.0]),
        "tensor_dict strided": torch.tensor([0.0]),
        "broadcast_object": c[0],
        # every rank's loss sums |w_r|^2 over both ranks: torch's gradient of |w|^2 is 2w
        "gradient": 2 * 2 * z[me],
    }
    if me == 1:
        expected["send/recv"] = c[0]
    return {k: None if v is None else v.tolist() for k, v in expected.items()}


@pytest.mark.parametrize("runner", ["gloo", "simulate"])
def test_lazy_conj_and_negative_views_move_their_values(runner: str, spawn_timeout: int) -> None:
    """A ``conj()`` view's memory holds the unconjugated values, the ``.imag`` of one its values
    negated: as inputs, every collective moves what they read; as ``out=``, each reads the
    result back. gloo moved the raw memory, refused a complex view after the peer had gone
    ahead (a hang), or, for a negative view, reduced the negated values (max became min)."""
    if runner == "gloo":
        reports = topo.spawn(lazy.lazy_views, DeviceMesh(tp=2), timeout=spawn_timeout)
    else:
        reports = topo.simulate(DeviceMesh(tp=2), lazy.lazy_views)
    for me, got in enumerate(reports):
        assert got == _lazy_view_expectations(me), me


def test_cpu_collectives_inside_a_default_device_context(spawn_timeout: int) -> None:
    # Model code often runs under `with torch.device("meta"):` (deferred init) or
    # torch.set_default_device; topo's CPU (gloo) outputs and object payloads stay on the CPU.
    reports = topo.spawn(fns.under_default_device, DeviceMesh(tp=2), "meta", timeout=spawn_timeout)
    inputs = [[1.0, 10.0], [2.0, 20.0]]
    for me, got in enumerate(reports):
        assert got["broadcast_object"] == {"from": 1}
        assert got["all_gather_object"] == ["rank 0", "rank 1"]
        assert got["empty tensor object"] == ([], "cpu")
        assert got["all_gather"] == (inputs[0] + inputs[1], "cpu")
        assert got["broadcast"] == (inputs[1], "cpu")
        assert got["reduce_scatter"] == ([inputs[0][me] + inputs[1][me]], "cpu")
        assert got["all_to_all"] == ([inputs[0][me], inputs[1][me]], "cpu")
        assert got["all_gatherv"] == (inputs[0][:1] + inputs[1], "cpu")
        assert got["broadcast_tensor_dict"] == (inputs[1], "cpu")

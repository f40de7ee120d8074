"""torch interop: topo groups as torch ProcessGroups, topo meshes as torch DeviceMeshes (DTensor,
FSDP2), and back.

Multi-process tests spawn a 2×2 mesh once (tests/_interop_fns.py reports what each rank got)
and the FSDP2 + TP example once; the parent computes every expected value from all ranks'
inputs and the mesh's pure rank math. Local tests use single-rank meshes and the fake cupy of
tests/test_nccl.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _interop_fns as fns
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import distributed_c10d as c10d

import topo
from topo import DeviceMesh, World
from topo.context import MeshContext
from topo.errors import NoActiveMeshError, TopoTypeError, TopoValueError

SPAWN_TIMEOUT = 100
MESH = DeviceMesh(dp=2, tp=2)
WORLD = World(rank=0, world_size=1, master_port=0)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ------------------------------------------------------------------ over real processes


@pytest.fixture(scope="module")
def reports() -> list[dict[str, Any]]:
    sys.path.insert(0, str(EXAMPLES))  # the spawned ranks inherit sys.path
    try:
        results: list[dict[str, Any]] = topo.spawn(fns.interop_main, MESH, timeout=SPAWN_TIMEOUT)
    finally:
        sys.path.remove(str(EXAMPLES))
    return results


def _key(axis: Any) -> str:
    return axis if isinstance(axis, str) else ".".join(axis)


@pytest.mark.multiprocess
def test_groups_match_references(reports: list[dict[str, Any]]) -> None:
    cases = [(axis, _key(axis)) for axis in fns.AXES]
    cases += [(axis, f"wrapper:{_key(axis)}") for axis in fns.AXES[1:]]
    for rank, report in enumerate(reports):
        for axis, key in cases:
            got = report["groups"][key]
            group = MESH.group(axis, rank)
            index = MESH.axis_index(axis, rank)
            inputs = [fns.rank_input(r) for r in group]
            total = torch.stack(inputs).sum(0)
            rows = 4 // len(group)
            assert got["same"] and got["backend"] == ("gloo" if ":" not in key else "topo")
            assert (got["rank"], got["size"], got["ranks"]) == (index, len(group), list(group))
            assert torch.equal(got["all_reduce"], total)
            assert torch.equal(got["max"], torch.stack(inputs).amax(0))
            assert torch.equal(got["all_gather"], torch.cat(inputs))
            assert torch.equal(got["reduce_scatter"], total[index * rows : (index + 1) * rows])
            assert torch.equal(got["broadcast"], inputs[-1])
            chunk = slice(index * rows, (index + 1) * rows)
            assert torch.equal(got["all_to_all"], torch.cat([i[chunk] for i in inputs]))
            assert torch.equal(got["all_gather_list"], torch.cat(inputs))
            assert torch.equal(got["f_all_reduce"], total)
            assert torch.equal(got["f_by_name"], total)
            assert torch.equal(got["f_all_gather"], torch.cat(inputs))
            assert torch.equal(got["f_reduce_scatter"], total[chunk])
            last = index == len(group) - 1
            assert (got["reduce"] is not None) == last  # reduce / gather / scatter: by root
            assert not last or torch.equal(got["reduce"], total)
            assert (got["gather"] is not None) == (index == 0)
            assert index != 0 or torch.equal(got["gather"], torch.cat(inputs))
            assert torch.equal(got["scatter"], inputs[0][chunk])
    names = {report["groups"]["tp"]["name"] for report in reports}
    assert len(names) == len(MESH.groups("tp"))  # one name per group, the same on its ranks


@pytest.mark.multiprocess
def test_torch_mesh_groups_and_dtensor(reports: list[dict[str, Any]]) -> None:
    w = fns.weight()
    for rank, report in enumerate(reports):
        got = report["mesh"]
        coords = MESH.coords(rank)
        assert got["same"] and got["group_is_topo"]
        assert got["names"] == ("dp", "tp") and got["layout"] == [[0, 1], [2, 3]]
        assert tuple(got["coordinate"]) == (coords["dp"], coords["tp"])
        assert got["groups"] == {n: list(MESH.group(n, rank)) for n in ("dp", "tp")}
        assert got["local_ranks"] == coords
        local = w.chunk(2, 0)[coords["dp"]].chunk(2, 1)[coords["tp"]]
        assert torch.equal(got["local"], local)
        assert torch.equal(got["full"], w)
        assert torch.allclose(got["matmul"], w @ w.T)
        assert torch.allclose(got["rowsum"], w.sum(1))
        assert got["transposed"] == (("tp", "dp"), [[0, 2], [1, 3]])
        assert got["flat"] == (("dp_tp",), [0, 1, 2, 3])
        assert got["from_torch"] == repr(MESH)


@pytest.mark.multiprocess
def test_two_activations_and_teardown(reports: list[dict[str, Any]]) -> None:
    for rank, report in enumerate(reports):
        got = report["teardown"]
        assert got["before"] == {"default": None, "names": [], "tags": []}
        assert got["default_a"].startswith("topo:topo/interop-a/")
        assert torch.equal(got["inner"]["x_sum"], torch.full((2,), 6.0))
        assert torch.equal(got["inner"]["tp_sum"], torch.full((2,), float(sum(MESH.group("tp", rank)))))
        assert got["inner"]["distinct"]
        assert got["after_b"]["default"] == got["default_a"]
        assert got["after_b"]["names"] and all("interop-a" in n for n in got["after_b"]["names"])
        assert got["b_resolvable"] == [False]
        assert got["after_a"] == got["before"] and got["a_resolvable"] == [False, False]
        assert got["is_initialized"] is False
        assert "has ended" in got["closed_error"]


@pytest.mark.multiprocess
def test_user_default_group_survives(reports: list[dict[str, Any]]) -> None:
    for rank, report in enumerate(reports):
        coords = MESH.coords(rank)
        for key, user_rank, kept in (("user_same", rank, True), ("user_shuffled", 3 - rank, False)):
            got = report[key]
            assert got["tp_rank"] == coords["tp"] and got["ranks"] == list(MESH.group("tp", rank))
            assert tuple(got["coordinate"]) == (coords["dp"], coords["tp"])
            assert got["inside_is_user"] is kept  # kept when its ranks are topo's, else swapped
            assert got["after_is_user"] and got["after_rank"] == user_rank
            assert got["user_sum"] == 6.0
            assert got["after_destroy"] == {"default": None, "names": [], "tags": []}


@pytest.mark.multiprocess
def test_fsdp2_tp_example_equals_single_process(reports: list[dict[str, Any]]) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import fsdp2_tp

        ref = fsdp2_tp.reference()
    finally:
        sys.path.remove(str(EXAMPLES))
    for report in reports:
        result = report["fsdp2_tp"]
        assert abs(result["loss"] - ref["loss"]) < 1e-5
        assert result["params"].keys() == ref["params"].keys()
        for name, param in ref["params"].items():
            assert torch.allclose(result["params"][name], param, atol=1e-5), name


@pytest.mark.multiprocess
def test_fsdp2_tp_example_under_torchrun(closed_port: int) -> None:
    """The example as its docstring launches it with torchrun: every rank compares its loss and
    parameters with the single-process reference and exits non-zero on a difference."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
        "--master-addr=127.0.0.1", f"--master-port={closed_port}", str(EXAMPLES / "fsdp2_tp.py"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=SPAWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {SPAWN_TIMEOUT} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun: loss" in out and "max |diff| vs reference" in out, out[-3000:]


@pytest.mark.multiprocess
def test_functional_collectives_interleaved_with_topo_never_hang() -> None:
    """Regression for issue 9: torch's functional collectives and topo's collectives on the
    same groups, 300 times each way. Before the wrapper served torch's coalesced calls itself,
    a gloo worker and the main thread deadlocked over the GIL here within seconds (see
    docs/interop.md, "A deadlock with torch's functional collectives")."""
    iters = 300
    results = topo.spawn(fns.stress_main, MESH, iters, timeout=60)  # about 10 s
    for rank, seen in enumerate(results):
        for axis, device_type in (("tp", "cpu"), ("dp", "cuda")):
            group = MESH.group(axis, rank)
            inputs = [fns.rank_input(r) for r in group]
            total = float(torch.stack(inputs).sum())
            arange_sum = 3.0 * len(group) * sum(range(iters))
            rows = 4 // len(group)
            index = MESH.axis_index(axis, rank)
            mine = float(torch.stack(inputs).sum(0)[index * rows : (index + 1) * rows].sum())
            expected = [iters * total, iters * total, arange_sum, iters * total, iters * mine]
            assert seen[f"{axis}:{device_type}"] == pytest.approx(expected), (rank, axis)


# ------------------------------------------------------------------ in this process


@pytest.fixture
def ctx() -> Iterator[MeshContext]:
    with DeviceMesh(dp=1, tp=1).activate(WORLD, store=dist.HashStore(), timeout=30) as context:
        yield context
    assert c10d._world.default_pg is None and not c10d._world.pg_names


def test_single_rank_group_registered_then_gone(ctx: MeshContext) -> None:
    pg = ctx.torch_group("tp", device_type="cpu")
    t = torch.arange(3.0)
    dist.all_reduce(t, group=pg)
    assert t.tolist() == [0.0, 1.0, 2.0] and dist.get_rank(pg) == 0
    assert c10d._resolve_process_group(pg.group_name) is pg
    # no wrapper on the CPU path: torch calls topo's own gloo process group
    assert pg._get_backend(torch.device("cpu")) is ctx.communicator(("tp",), "cpu").pg  # type: ignore[attr-defined]
    assert funcol.all_reduce(t, "sum", pg).wait().tolist() == [0.0, 1.0, 2.0]
    mesh = ctx.torch_mesh(device_type="cpu")
    assert mesh.mesh_dim_names == ("dp", "tp")
    assert DeviceMesh.from_torch(mesh) == DeviceMesh(dp=1, tp=1)
    assert dist.is_initialized()  # topo's world group is the default while active


def test_bad_input(ctx: MeshContext) -> None:
    with pytest.raises(TopoValueError, match=r"'dp'.*'tp'|'tp'.*'dp'"):
        ctx.torch_group("zz")
    with pytest.raises(TopoValueError, match="at most once"):
        ctx.torch_mesh(("dp", "dp"))
    with pytest.raises(TopoTypeError, match="valid axes"):
        ctx.torch_mesh(5)
    with pytest.raises(TopoValueError, match="'cpu', 'cuda'"):
        ctx.torch_group("tp", device_type="tpu")
    with pytest.raises(TopoTypeError, match="MeshContext"):
        topo.torch_group("tp", ctx="ctx")  # type: ignore[arg-type]


def test_outside_an_activation() -> None:
    with pytest.raises(NoActiveMeshError, match=r"mesh\.activate"):
        topo.torch_mesh()
    with pytest.raises(NoActiveMeshError, match=r"mesh\.activate"):
        topo.torch_group("tp")
    with pytest.raises(NoActiveMeshError, match="init_process_group"):
        topo.torch_store()


class _FakeTorchMesh:
    def __init__(self, layout: list[Any], names: tuple[str, ...] | None) -> None:
        self.mesh = torch.tensor(layout)
        self.mesh_dim_names = names


def test_from_torch_layouts() -> None:
    assert DeviceMesh.from_torch(_FakeTorchMesh([[0, 1], [2, 3]], ("dp", "tp"))) == MESH
    assert DeviceMesh.from_torch(_FakeTorchMesh([[0, 2], [1, 3]], ("tp", "dp"))) == MESH
    cube = torch.arange(8).reshape(2, 2, 2).permute(2, 0, 1).tolist()
    assert DeviceMesh.from_torch(_FakeTorchMesh(cube, ("c", "a", "b"))) == DeviceMesh(a=2, b=2, c=2)
    with pytest.raises(TopoValueError, match="no order of its axes"):
        DeviceMesh.from_torch(_FakeTorchMesh([[0, 3], [1, 2]], ("a", "b")))
    with pytest.raises(TopoValueError, match="root mesh"):
        DeviceMesh.from_torch(_FakeTorchMesh([2, 3], ("tp",)))
    with pytest.raises(TopoValueError, match="mesh_dim_names"):
        DeviceMesh.from_torch(_FakeTorchMesh([0, 1], None))
    with pytest.raises(TopoTypeError, match="DeviceMesh"):
        DeviceMesh.from_torch(3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.13 renames the *_tensor APIs
def test_cuda_wrapper_plumbing_with_fake_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA ProcessGroup wrapper sends torch's collectives through topo's NCCL
    communicator; here that communicator runs on a fake cupy.cuda.nccl (no GPU)."""
    from test_nccl import _fake_communicator

    from topo.interop import TopoProcessGroup, _register, _unregister

    nccl, calls, _ = _fake_communicator(monkeypatch)
    pg = TopoProcessGroup(0, 1, lambda device_type: nccl)
    store = dist.HashStore()
    pg._register_backend(torch.device("cpu"), pg.BackendType.GLOO, dist.ProcessGroupGloo(store, 0, 1))
    pg._set_group_name("topo-fake-nccl")
    _register(pg, "topo-fake-nccl", (0,), store, "topo")
    try:
        t = torch.arange(4.0)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and calls.calls[-1][0] == "allReduce"
        out = torch.empty(4)
        dist.all_gather_into_tensor(out, t, group=pg)
        assert torch.equal(out, t) and calls.calls[-1][0] == "allGather"
        rs = torch.empty(4)
        dist.reduce_scatter_tensor(rs, t, group=pg)
        assert torch.equal(rs, t) and calls.calls[-1][0] == "reduceScatter"
        dist.broadcast(t, src=0, group=pg)
        assert calls.calls[-1][0] == "broadcast"
        listed = [torch.empty(4)]
        dist.all_gather(listed, t, group=pg)
        assert torch.equal(listed[0], t) and calls.calls[-1][0] == "allGather"
        dist.reduce_scatter(rs, [t], group=pg)
        assert torch.equal(rs, t) and calls.calls[-1][0] == "reduceScatter"
        a2a = torch.empty(4)
        dist.all_to_all_single(a2a, t, group=pg)
        assert torch.equal(a2a, t) and [c[0] for c in calls.calls[-2:]] == ["send", "recv"]
        assert funcol.all_reduce(t, "sum", pg).wait().tolist() == t.tolist()
        assert calls.calls[-1][0] == "allReduce" and dist.get_backend(pg) == "topo"
        # torch's functional collectives call the coalesced entry points from C++: the wrapper
        # serves them (torch's default would enqueue on gloo with the GIL held, see
        # topo/communicators/handoff.py, or find no CUDA backend)
        assert torch.equal(fns._all_gather(t, pg), t) and calls.calls[-1][0] == "allGather"
        assert torch.equal(fns._reduce_scatter(t, pg), t)
        assert calls.calls[-1][0] == "reduceScatter"
        dist.reduce(t, dst=0, op=dist.ReduceOp.SUM, group=pg)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0] and calls.calls[-1][0] == "allReduce"
        served: list[str] = []  # one rank's gather and scatter move nothing: spy on the calls
        for name in ("gather", "scatter"):
            real = getattr(nccl, name)
            spy = lambda *a, _real=real, _name=name: served.append(_name) or _real(*a)  # noqa: E731
            monkeypatch.setattr(nccl, name, spy)
        gathered = [torch.empty(4)]
        dist.gather(t, gathered, dst=0, group=pg)
        scattered = torch.empty(4)
        dist.scatter(scattered, [t], src=0, group=pg)
        assert torch.equal(gathered[0], t) and torch.equal(scattered, t)
        assert served == ["gather", "scatter"]
        with pytest.raises(TopoValueError, match="equal splits"):
            dist.all_to_all_single(torch.empty(4), t, [1, 3], [1, 3], group=pg)
    finally:
        _unregister(pg)
    assert not c10d._world.pg_names


def test_torch_mesh_layout_matches_topo_groups() -> None:
    """The rank layout torch_mesh hands torch: other axes at this rank's coordinates, and
    along each dimension exactly topo's group (pure; no processes)."""
    import itertools
    from types import SimpleNamespace

    from topo.interop import _rank_at

    mesh = DeviceMesh(dp=2, pp=2, tp=2)
    for dims in [(("dp",), ("tp",)), (("tp",), ("dp",)), (("dp", "tp"),), (("pp",), ("dp", "tp"))]:
        for rank in range(mesh.size):
            ctx: Any = SimpleNamespace(mesh=mesh, coords=mesh.coords(rank))
            sizes = [mesh.axis_size(names) for names in dims]
            at = {i: _rank_at(ctx, dims, i) for i in itertools.product(*map(range, sizes))}
            mine = next(i for i, r in at.items() if r == rank)
            for d, names in enumerate(dims):
                line = [at[(*mine[:d], k, *mine[d + 1 :])] for k in range(sizes[d])]
                assert tuple(line) == mesh.group(names, rank), (dims, rank, names)
    ctx = SimpleNamespace(mesh=mesh, coords=mesh.coords(5))
    assert [_rank_at(ctx, (("dp",), ("tp",)), (i, j)) for i in (0, 1) for j in (0, 1)] == [0, 1, 4, 5]

"""NCCL communicator: what can be checked without a GPU (dtype map, errors, lazy import,
the communicator's plumbing against a fake cupy.cuda.nccl), plus GPU tests that skip here."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import _fake_cupy
import pytest
import torch

import topo
from topo.communicators import nccl as nccl_mod
from topo.communicators.nccl_types import NCCL_DTYPES, NCCL_OPS, NCCL_REDUCE_DTYPES, nccl_dtype
from topo.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _gpu_fns for spawned ranks


def _has_gpu_and_cupy() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        nccl_mod.load_nccl()
    except BackendUnavailableError:
        return False
    return True


gpu = pytest.mark.skipif(not _has_gpu_and_cupy(), reason="needs a CUDA GPU and cupy with NCCL")


# ----------------------------------------------------------------------------- dtype map


def test_dtype_map_matches_nccl_h() -> None:
    assert {
        torch.int8: 0,
        torch.uint8: 1,
        torch.int32: 2,
        torch.int64: 4,
        torch.float16: 6,
        torch.float32: 7,
        torch.float64: 8,
        torch.bfloat16: 9,
    } == NCCL_DTYPES
    assert NCCL_OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
    assert frozenset(NCCL_DTYPES) == NCCL_REDUCE_DTYPES


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.bool]
)
def test_non_nccl_dtypes_move_as_bytes(dtype: torch.dtype) -> None:
    assert nccl_dtype(dtype, reducing=False) == NCCL_DTYPES[torch.uint8]
    with pytest.raises(TypeError, match=rf"NCCL cannot reduce dtype {dtype}.*float32"):
        nccl_dtype(dtype, reducing=True)


def test_collective_rejects_reduction_dtype_before_touching_cuda() -> None:
    from topo.collectives._common import check_reduce

    meta = torch.empty(2, dtype=torch.complex64, device="meta")
    with pytest.raises(ValueError, match="'cpu' \\(gloo\\) or 'cuda' \\(NCCL\\)"):
        topo.collectives._common.check_tensor(meta, "all_reduce")
    with pytest.raises(TypeError, match="gloo can reduce"):
        check_reduce(torch.zeros(2, dtype=torch.complex64), "sum", "all_reduce")


# ------------------------------------------------------------------------ import errors


def test_missing_cupy_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(
        BackendUnavailableError, match=r"require cupy.*pip install 'topo\[nccl-cu1[23]\]'"
    ):
        nccl_mod.load_nccl()


def test_missing_libnccl_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")

    def missing(name: str) -> object:
        raise ImportError("libnccl.so.2: cannot open shared object file: No such file")

    cuda.__getattr__ = missing  # type: ignore[attr-defined]
    cupy.cuda = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    with pytest.raises(BackendUnavailableError, match=r"libnccl.*nccl-cu12"):
        nccl_mod.load_nccl()


def test_cupy_without_nccl_support(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_cupy.make_nccl()
    fake.available = False  # type: ignore[attr-defined]
    _fake_cupy.install(monkeypatch, fake)
    with pytest.raises(BackendUnavailableError, match="without NCCL support"):
        nccl_mod.load_nccl()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cupy.install(monkeypatch, _fake_cupy.make_nccl())
    with pytest.raises(BackendUnavailableError, match=r"require a CUDA GPU.*CPU tensors"):
        nccl_mod.NcclCommunicator.create(
            None,  # type: ignore[arg-type]
            "scope",
            (0, 1),
            0,
            torch.device("cuda", 0),
            "axis 'tp' group (0, 1)",
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_graph_capture_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="requires a CUDA GPU"), topo.graph_capture():
        pass


@pytest.mark.multiprocess
def test_import_topo_and_cpu_collectives_never_import_cupy() -> None:
    code = (
        "import sys, torch, topo\n"
        "w = topo.World(rank=0, world_size=1, master_port=0)\n"
        "with topo.DeviceMesh(tp=1).activate(w, timeout=10):\n"
        "    y = topo.all_reduce(torch.ones(2), axis='tp')\n"
        "assert y.tolist() == [1.0, 1.0]\n"
        "bad = [m for m in sys.modules if m == 'cupy' or m.startswith('cupy.')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------- plumbing against a fake cupy.cuda.nccl


def _fake_communicator(
    monkeypatch: pytest.MonkeyPatch, version: int = 22703, major: int = 14
) -> tuple[nccl_mod.NcclCommunicator, Any, types.ModuleType]:
    """topo's communicator over a one-rank strict fake cupy communicator, CPU tensors."""
    fake = _fake_cupy.make_nccl(major, version)
    _fake_cupy.install(monkeypatch, fake)
    unique_id = nccl_mod.encode_unique_id(fake.get_unique_id())  # type: ignore[attr-defined]
    comm = fake.NcclCommunicator(1, nccl_mod.unique_id_argument(unique_id), 0)  # type: ignore[attr-defined]
    communicator = nccl_mod.NcclCommunicator(
        fake, comm, (0,), 0, torch.device("cpu"), "axis 'tp' group (0,)"
    )
    monkeypatch.setattr(communicator, "_stream", lambda: 0)
    return communicator, comm, fake


def test_plumbing_counts_dtypes_and_out_of_place(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, _ = _fake_communicator(monkeypatch, major=cupy_major)
    x = torch.arange(6, dtype=torch.bfloat16)
    before = x.clone()
    y = c.all_reduce(x, "max")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and torch.equal(x, before)
    assert comm.calls[-1] == ("allReduce", 6, NCCL_DTYPES[torch.bfloat16], NCCL_OPS["max"])
    into = torch.empty_like(x)
    assert c.broadcast_into(x, 0, into) is into and torch.equal(into, x)  # out= of broadcast
    assert c.broadcast_into(x, 0, x) is x and torch.equal(x, before)  # in place
    g = c.all_gather(torch.arange(4, dtype=torch.int32))
    assert g.shape == (1, 4) and g[0].tolist() == [0, 1, 2, 3]
    # 8-bit floats travel as bytes when nothing is reduced
    f8 = torch.arange(5, dtype=torch.float32).to(torch.float8_e4m3fn)
    b = c.broadcast(f8, 0)
    assert comm.calls[-1] == ("broadcast", 5, NCCL_DTYPES[torch.uint8], 0)
    assert torch.equal(b.view(torch.uint8), f8.view(torch.uint8))
    c64 = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    gathered = c.all_gather(c64)
    assert comm.calls[-1] == ("allGather", 16, NCCL_DTYPES[torch.uint8])
    assert torch.equal(gathered[0], c64)
    rs = c.reduce_scatter(torch.ones(1, 3), "sum")
    assert rs.shape == (3,) and comm.calls[-1][:2] == ("reduceScatter", 3)


def test_plumbing_group_calls_for_point_to_point(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, fake = _fake_communicator(monkeypatch, major=cupy_major)
    x = torch.arange(6.0).reshape(1, 6)
    out = c.all_to_all(x)
    assert torch.equal(out, x)
    assert fake.groups == ["start", "end"]  # type: ignore[attr-defined]
    assert [call[0] for call in comm.calls] == ["send", "recv"]
    buf = torch.empty(3)
    c.exchange([(0, torch.tensor([7.0, 8.0, 9.0]))], [(0, buf)])
    assert buf.tolist() == [7.0, 8.0, 9.0]
    assert fake.groups == ["start", "end", "start", "end"]  # type: ignore[attr-defined]


def test_avg_falls_back_to_sum_on_old_nccl(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, _ = _fake_communicator(monkeypatch, version=2708, major=cupy_major)
    y = c.all_reduce(torch.full((2,), 3.0), "avg")
    assert comm.calls[-1][3] == NCCL_OPS["sum"] and y.tolist() == [3.0, 3.0]
    c2, comm2, _ = _fake_communicator(monkeypatch, version=21003, major=cupy_major)
    c2.all_reduce(torch.full((2,), 3.0), "avg")
    assert comm2.calls[-1][3] == NCCL_OPS["avg"]


def test_device_mismatch_names_both_devices(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, _, _ = _fake_communicator(monkeypatch, major=cupy_major)
    meta = torch.empty(2, device="meta")
    with pytest.raises(
        ValueError, match=r"requires tensors on this rank's NCCL device cpu, but got one on meta"
    ):
        c.all_reduce(meta, "sum")


def test_nccl_errors_are_wrapped_and_close_is_idempotent(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, fake = _fake_communicator(monkeypatch, major=cupy_major)

    def boom(*args: object) -> None:
        raise fake.NcclError("unhandled system error")  # type: ignore[attr-defined]

    monkeypatch.setattr(comm, "allReduce", boom)
    with pytest.raises(
        topo.CommunicationError, match=r"all_reduce on axis 'tp' group \(0,\) failed in NCCL"
    ):
        c.all_reduce(torch.ones(2), "sum")
    monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
    c.close(abort=True)
    c.close()
    assert comm.calls[-1] == ("abort",)
    with pytest.raises(topo.CommunicationError, match="closed"):
        c.all_reduce(torch.ones(2), "sum")


# ----------------------------------------------------------------------------- GPU tests


@gpu
@pytest.mark.gpu
@pytest.mark.multiprocess
def test_gpu_collectives_match_gloo_on_a_shared_gpu() -> None:
    import _gpu_fns

    mesh = topo.DeviceMesh(dp=2, tp=2)
    on_gpu = topo.spawn(_gpu_fns.every_collective, mesh, "cuda", share_gpu=True, timeout=300)
    on_cpu = topo.spawn(_gpu_fns.every_collective, mesh, "cpu", timeout=120)
    for rank, (g, c) in enumerate(zip(on_gpu, on_cpu, strict=True)):
        assert g.keys() == c.keys()
        for key in c:
            assert _same(g[key], c[key]), (rank, key, g[key], c[key])


@gpu
@pytest.mark.gpu
@pytest.mark.multiprocess
def test_gpu_streams_graphs_and_several_communicators() -> None:
    import _gpu_fns

    results = topo.spawn(_gpu_fns.streams_graphs_meshes, topo.DeviceMesh(dp=2, tp=2),
                         share_gpu=True, timeout=300)  # fmt: skip
    for rank, checks in enumerate(results):
        assert all(checks.values()), (rank, checks)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class _NeverDone:
    def query(self) -> bool:
        return False


def test_synchronize_times_out_and_aborts_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
    cupy_major: int,
) -> None:
    import contextlib
    from datetime import timedelta

    c, comm, _ = _fake_communicator(monkeypatch, major=cupy_major)
    c.timeout = timedelta(seconds=0.05)
    comm.check_async_error = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NeverDone())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    with pytest.raises(
        topo.CommunicationTimeout, match=r"barrier on axis 'tp' group \(0,\) timed out"
    ):
        c.synchronize("barrier")
    assert comm.calls[-1] == ("abort",)


def test_synchronize_reports_async_nccl_errors(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    import contextlib

    c, comm, fake = _fake_communicator(monkeypatch, major=cupy_major)

    def failed() -> None:
        raise fake.NcclError("remote process exited")  # type: ignore[attr-defined]

    comm.check_async_error = failed  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NeverDone())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    with pytest.raises(topo.CommunicationError, match="remote process exited"):
        c.synchronize("barrier")
    assert comm.calls[-1] == ("abort",)


# ------------------------------------------------- the fast paths, against the strict fake


def _two_rank_fake(
    monkeypatch: pytest.MonkeyPatch, major: int, index: int = 0
) -> tuple[nccl_mod.NcclCommunicator, Any]:
    """topo's communicator, index ``index`` of 2, over a strict fake that records calls."""
    fake = _fake_cupy.make_nccl(major)
    _fake_cupy.install(monkeypatch, fake)
    comm = fake.NcclCommunicator(2, fake.get_unique_id(), index)  # type: ignore[attr-defined]
    c = nccl_mod.NcclCommunicator(fake, comm, (0, 1), index, torch.device("cpu"), "axis 'tp'")
    monkeypatch.setattr(c, "_stream", lambda: 0)
    return c, comm


def test_fast_paths_move_the_right_bytes_on_one_rank(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    c, comm, _ = _fake_communicator(monkeypatch, major=cupy_major)
    x = torch.arange(6.0).reshape(3, 2)
    out = torch.empty(3, 2)
    assert c.all_reduce_into(x, "sum", out) is out and torch.equal(out, x)
    assert torch.equal(c.all_gather_dim0(x), x)
    assert torch.equal(c.reduce_scatter_dim0(x, "max"), x)
    assert torch.equal(c.all_to_all_dim0(x), x)
    assert torch.equal(c.all_gatherv_dim0(x, [3]), x)
    c64 = torch.tensor([1 + 2j, 3 - 1j])
    assert torch.equal(c.all_gatherv_dim0(c64, [2]), c64)  # moved as bytes
    assert comm.calls[-2][:3] == ("send", 16, NCCL_DTYPES[torch.uint8])
    assert torch.equal(c.gather(x, 0), x.unsqueeze(0))  # type: ignore[arg-type]
    assert torch.equal(c.scatter(x.unsqueeze(0), 0), x)


def test_fast_paths_address_each_peers_block(
    monkeypatch: pytest.MonkeyPatch, cupy_major: int
) -> None:
    """Two ranks: counts, dtype codes, peers and the pointer of every block, as NCCL sees them."""
    c, comm = _two_rank_fake(monkeypatch, cupy_major, index=1)
    calls: list[tuple[Any, ...]] = []
    for name in ("send", "recv"):
        monkeypatch.setattr(comm, name, lambda *a, name=name: calls.append((name, *a)))
    x = torch.arange(8.0).reshape(4, 2)
    out = c.all_to_all_dim0(x)
    assert out.shape == x.shape
    base, got = x.data_ptr(), out.data_ptr()
    assert calls == [("send", base, 4, 7, 0, 0), ("recv", got, 4, 7, 0, 0),
                     ("send", base + 16, 4, 7, 1, 0), ("recv", got + 16, 4, 7, 1, 0)]  # fmt: skip
    calls.clear()
    gathered = c.all_gatherv_dim0(x[:3].contiguous(), [1, 3])  # index 1 holds 3 rows
    assert gathered.shape == (4, 2)
    start = gathered.data_ptr()
    assert [k[0:3] + k[4:5] for k in calls] == [
        ("send", calls[0][1], 6, 0), ("recv", start, 2, 0),
        ("send", calls[0][1], 6, 1), ("recv", start + 8, 6, 1),
    ]  # fmt: skip
    rs = c.reduce_scatter_dim0(x, "sum")
    assert rs.shape == (2, 2) and comm.calls[-1] == ("reduceScatter", 4, 7, 0)
    g = c.all_gather_dim0(x)
    assert g.shape == (8, 2) and comm.calls[-1] == ("allGather", 8, 7)
    with pytest.raises(TypeError, match=r"NCCL cannot reduce dtype torch\.complex64"):
        c.reduce_scatter_dim0(torch.ones(4, dtype=torch.complex64), "sum")

"""The bad-input table: each kind of wrong argument gives a topo error of the right type whose
message names what was required — never a raw exception from torch, gloo or Python, never a
hang. Every input that once escaped (issue 14) has a row here.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import topo
from topo.coordinator import Coordinator
from topo.mesh import DeviceMesh, parse_mesh
from topo.world import World

TopoValue, TopoType = topo.TopoValueError, topo.TopoTypeError


@pytest.fixture(scope="module")
def ctx() -> Iterator[topo.MeshContext]:
    """A one-rank activation (axis tp of size 1) for the collective rows."""
    with DeviceMesh(tp=1).activate(World(rank=0, world_size=1, master_port=0), timeout=10) as c:
        yield c


def _sparse() -> torch.Tensor:
    return torch.eye(2).to_sparse()


def _nested() -> torch.Tensor:
    return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)


def _inference_zeros(n: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.zeros(n)


def _activate(mesh: DeviceMesh, world: World | None = None, **kwargs: Any) -> None:
    with mesh.activate(world or World(rank=0, world_size=mesh.size, master_port=0), **kwargs):
        pass


# (id, call, expected type, phrase in the message)
MESH_AND_WORLD: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("mesh size 10**18", lambda: DeviceMesh(dp=10**18), TopoValue, "at most 2147483647 ranks"),
    ("mesh size 0", lambda: DeviceMesh(dp=0), TopoValue, "positive"),
    ("mesh size float", lambda: DeviceMesh(dp=2.0), TopoType, "int(2.0)"),
    ("mesh size str", lambda: DeviceMesh(dp="2"), TopoType, "requires an int"),
    ("mesh size bool", lambda: DeviceMesh(dp=True), TopoType, "bool"),
    ("mesh no axes", lambda: DeviceMesh(), TopoValue, "at least one axis"),
    ("mesh keyword name", lambda: DeviceMesh.from_shape((2,), ("for",)), TopoValue, "keyword"),
    ("mesh duplicate name", lambda: DeviceMesh.from_shape((2, 2), ("a", "a")), TopoValue, "distinct"),
    ("mesh unknown axis", lambda: DeviceMesh(dp=2).group("tp", 0), TopoValue, "has axes 'dp'"),
    ("mesh rank range", lambda: DeviceMesh(dp=2).coords(2), TopoValue, "0 <= rank < 2"),
    ("mesh spec", lambda: parse_mesh("dp=two"), TopoValue, "dp"),
    ("placement divisor", lambda: DeviceMesh(dp=8).placement(3), TopoValue, "divisor"),
    ("world rank >= size", lambda: World(rank=2, world_size=2), TopoValue, "rank < world_size"),
    ("world port range", lambda: World(rank=0, world_size=1, master_port=70000), TopoValue, "<= 65535"),
    ("world addr blank", lambda: World(rank=0, world_size=1, master_addr=" "), TopoValue, "no blanks"),
    ("world env missing", lambda: World.from_env({}), topo.WorldError, "found no RANK"),
    (
        "world env blank MASTER_ADDR",
        lambda: World.from_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": " "}),
        topo.WorldError,
        "MASTER_ADDR requires",
    ),
    (
        "world env non-int",
        lambda: World.from_env({"RANK": "x", "WORLD_SIZE": "1"}),
        topo.WorldError,
        "RANK requires an integer",
    ),
]

ACTIVATION: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("timeout inf", lambda: _activate(DeviceMesh(tp=1), timeout=float("inf")), TopoValue, "finite"),
    ("timeout 1e20", lambda: _activate(DeviceMesh(tp=1), timeout=1e20), TopoValue, "finite"),
    ("timeout nan", lambda: _activate(DeviceMesh(tp=1), timeout=float("nan")), TopoValue, "positive"),
    ("timeout negative", lambda: _activate(DeviceMesh(tp=1), timeout=-1), TopoValue, "positive"),
    ("timeout -0.0", lambda: _activate(DeviceMesh(tp=1), timeout=-0.0), TopoValue, "positive"),
    ("timeout str", lambda: _activate(DeviceMesh(tp=1), timeout="5"), TopoType, "seconds"),
    ("timeout bool", lambda: _activate(DeviceMesh(tp=1), timeout=True), TopoType, "bool"),
    ("device cpu", lambda: _activate(DeviceMesh(tp=1), device="cpu"), TopoValue, "CUDA device"),
    ("secret short", lambda: _activate(DeviceMesh(tp=1), secret=b"abc"), TopoValue, "8 bytes"),
    ("secret int", lambda: _activate(DeviceMesh(tp=1), secret=123), TopoType, "bytes or a str"),
    ("bind blank", lambda: _activate(DeviceMesh(tp=1), bind=" "), TopoValue, "no blanks"),
    (
        "bind foreign address",
        lambda: _activate(DeviceMesh(tp=1), bind="203.0.113.7"),
        TopoValue,
        "not one here",
    ),
    (
        "mesh/world mismatch",
        lambda: DeviceMesh(dp=2).activate(World(rank=0, world_size=1)).__enter__(),
        TopoValue,
        "does not match world size 1",
    ),
    ("activate non-mesh", lambda: topo.activate("dp=2").__enter__(), TopoType, "DeviceMesh"),
    ("collective outside", lambda: topo.all_reduce(torch.ones(1), "zz"), topo.NoActiveMeshError, "activate"),
]

COLLECTIVES: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("list not tensor", lambda: topo.all_reduce([1.0], "tp"), TopoType, "torch.Tensor"),
    ("op mean", lambda: topo.all_reduce(torch.ones(1), "tp", op="mean"), TopoValue, "'avg'"),
    ("avg of ints", lambda: topo.all_reduce(torch.ones(1, dtype=torch.int64), "tp", op="avg"), TopoType, "floating"),
    ("reduce complex", lambda: topo.all_reduce(torch.ones(1, dtype=torch.complex64), "tp"), TopoType, "can reduce"),
    ("sparse coo", lambda: topo.all_reduce(_sparse(), "tp"), TopoType, "to_dense"),
    ("sparse csr", lambda: topo.all_gather(torch.eye(2).to_sparse_csr(), "tp"), TopoType, "dense"),
    ("nested", lambda: topo.broadcast(_nested(), "tp"), TopoType, "nested"),
    ("quantized", lambda: topo.all_reduce(_quantized(), "tp"), TopoType, "dequantize"),
    ("quantized gather", lambda: topo.all_gather(_quantized(), "tp"), TopoType, "dequantize"),
    ("quantized scatter", lambda: topo.reduce_scatter(_quantized(), "tp"), TopoType, "dequantize"),
    ("unknown axis", lambda: topo.all_reduce(torch.ones(1), "dp"), TopoValue, "'tp'"),
    ("axis int", lambda: topo.all_reduce(torch.ones(1), 3), TopoType, "axis"),
    ("dim range", lambda: topo.all_gather(torch.ones(2), "tp", dim=5), TopoValue, "-1 <= dim < 1"),
    ("dim float", lambda: topo.all_gather(torch.ones(2), "tp", dim=0.0), TopoType, "int(0.0)"),
    ("src range", lambda: topo.broadcast(torch.ones(1), "tp", src=1), TopoValue, "0 <= src < 1"),
    ("src bool", lambda: topo.broadcast(torch.ones(1), "tp", src=False), TopoType, "bool"),
    ("perm not list", lambda: topo.ppermute(torch.ones(1), "tp", perm=5), TopoType, "(src, dst)"),
    ("perm index", lambda: topo.ppermute(torch.ones(1), "tp", perm=[(0, 1)]), TopoValue, "perm dst"),
    ("shift float", lambda: topo.shift(torch.ones(1), "tp", offset=1.5), TopoType, "whole number"),
    ("shift wrap str", lambda: topo.shift(torch.ones(1), "tp", wrap="yes"), TopoType, "True or False"),
    ("recv negative shape", lambda: topo.recv((-1,), torch.float32, "tp", src=0), TopoValue, "non-negative"),
    ("recv float shape", lambda: topo.recv((2.5,), torch.float32, "tp", src=0), TopoType, "shape"),
    ("recv shape str", lambda: topo.recv("4", torch.float32, "tp", src=0), TopoType, "sequence of ints"),
    ("recv dtype str", lambda: topo.recv((2,), "float32", "tp", src=0), TopoType, "torch.dtype"),
    ("recv device", lambda: topo.recv((2,), torch.float32, "tp", src=0, device="nope"), TopoValue, "device"),
    ("recv out list", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=[0.0, 0.0]), TopoType, "torch.Tensor (or None)"),
    ("recv out dtype", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=torch.zeros(2, dtype=torch.float64)), TopoType, "dtype and device it receives"),
    ("recv out shape", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=torch.zeros(3)), TopoValue, "shape it receives (2,)"),
    ("recv out grad", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=torch.zeros(2, requires_grad=True)), TopoValue, "needs no gradient"),
    ("recv out expanded", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=torch.zeros(1).expand(2)), TopoValue, "share memory"),
    ("recv out inference", lambda: topo.recv((2,), torch.float32, "tp", src=0, out=_inference_zeros(2)), TopoValue, "inference_mode"),
    ("function object", lambda: topo.broadcast_object(lambda: 0, "tp"), TopoType, "allow_pickle=True"),
    (
        "unpicklable gather",
        lambda: topo.all_gather_object(threading.Lock(), "tp", allow_pickle=True),
        TopoType,
        "pickling",
    ),
    (
        "lock gather",
        lambda: topo.all_gather_object(threading.Lock(), "tp"),
        TopoType,
        "plain values",
    ),
    (
        "json gather",
        lambda: topo.current().coordinator.all_gather_json({1, 2}),
        TopoType,
        "JSON-able",
    ),
    ("coordinator bytes", lambda: topo.current().coordinator.broadcast("s", src=0), TopoType, "bytes"),
]


def _fn() -> int:
    return 1


def _mq(**kwargs: Any) -> topo.MessageQueue:
    return topo.MessageQueue("tp", **kwargs)


def _enqueue(data: Any, raw: bool) -> None:
    with topo.MessageQueue("tp") as mq:
        mq.enqueue_bytes(data) if raw else mq.enqueue(data)


#: Escapes found by the security retest of 2026-12-04 (issue 19), each now a TopoError.
SECURITY_II: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("parse_mesh None", lambda: parse_mesh(None), TopoType, "a mesh spec requires a str"),  # type: ignore[arg-type]
    ("parse_mesh ints", lambda: parse_mesh([2, 2]), TopoType, "a mesh spec requires a str"),  # type: ignore[list-item]
    ("activate store str", lambda: _activate(DeviceMesh(tp=1), store="x"), TopoType, "torch.distributed.Store"),
    ("activate device -1", lambda: _activate(DeviceMesh(tp=1), device=-1), TopoValue, "index >= 0"),
    ("activate device garbage", lambda: _activate(DeviceMesh(tp=1), device="gpu:x"), TopoValue, "like 'cuda:0'"),
    ("mq slots 2**40", lambda: _mq(slots=2**40), TopoValue, "<= 65536"),
    ("mq slot_bytes 2**62", lambda: _mq(slot_bytes=2**62), TopoValue, "<= 1073741824"),
    ("mq enqueue lambda", lambda: _enqueue(lambda: 0, raw=False), TopoType, "allow_pickle=True"),
    ("mq enqueue_bytes str", lambda: _enqueue("text", raw=True), TopoType, "requires bytes"),
    (
        "MASTER_ADDR wildcard",
        lambda: _activate(DeviceMesh(tp=1), World(rank=0, world_size=1, master_addr="0.0.0.0")),
        TopoValue,
        "bind='0.0.0.0'",
    ),
    (
        "bridge wildcard",
        lambda: topo.transfer.bridge("0.0.0.0", 0, 0, 2).__enter__(),
        TopoValue,
        "wildcard '0.0.0.0'",
    ),
]


SPAWN: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("spawn fn", lambda: topo.spawn(5, DeviceMesh(tp=1)), TopoType, "callable"),
    ("spawn mesh", lambda: topo.spawn(_fn, "tp=1"), TopoType, "DeviceMesh"),
    ("spawn timeout 0", lambda: topo.spawn(_fn, DeviceMesh(tp=1), timeout=0), TopoValue, "positive"),
    ("spawn timeout inf", lambda: topo.spawn(_fn, DeviceMesh(tp=1), timeout=float("inf")), TopoValue, "finite"),
    ("spawn share_gpu str", lambda: topo.spawn(_fn, DeviceMesh(tp=1), share_gpu="no"), TopoType, "True or False"),
    ("spawn env values", lambda: topo.spawn(_fn, DeviceMesh(tp=1), env={"A": 1}), TopoType, "str(value)"),
    ("spawn env type", lambda: topo.spawn(_fn, DeviceMesh(tp=1), env=["A=1"]), TopoType, "mapping"),
    ("spawn env name", lambda: topo.spawn(_fn, DeviceMesh(tp=1), env={"A=B": "1"}), TopoValue, "'='"),
    ("spawn lambda", lambda: topo.spawn(lambda: 0, DeviceMesh(tp=1)), TopoType, "picklable"),
]


def _table(rows: list[tuple[str, Callable[[], object], type[BaseException], str]]) -> Any:
    return pytest.mark.parametrize(
        ("call", "kind", "phrase"), [pytest.param(c, k, p, id=i) for i, c, k, p in rows]
    )


def _check(call: Callable[[], object], kind: type[BaseException], phrase: str) -> None:
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, topo.TopoError), type(info.value).__mro__
    assert phrase in str(info.value), str(info.value)


@_table(MESH_AND_WORLD)
def test_mesh_and_world(call: Callable[[], object], kind: type[BaseException], phrase: str) -> None:
    _check(call, kind, phrase)


@_table(ACTIVATION)
def test_activation(call: Callable[[], object], kind: type[BaseException], phrase: str) -> None:
    _check(call, kind, phrase)


@_table(COLLECTIVES)
def test_collectives(
    ctx: topo.MeshContext, call: Callable[[], object], kind: type[BaseException], phrase: str
) -> None:
    _check(call, kind, phrase)


def _remember_the_routes() -> None:
    """One good call of each collective on axis tp: their routes are remembered after it."""
    x = torch.ones(2)
    for op in ("sum", "avg", "max"):
        topo.all_reduce(x, "tp", op=op)
        topo.reduce_scatter(x, "tp", op=op)
    topo.all_gather(x, "tp")
    topo.broadcast(x, "tp")
    topo.scatter(x, "tp")
    topo.gather(x, "tp")
    topo.all_to_all(x, "tp")
    topo.all_gatherv(x, "tp", sizes=[2])
    assert ("tp", "cpu") in topo.current()._routes


@_table(COLLECTIVES)
def test_collectives_after_their_routes_are_remembered(
    ctx: topo.MeshContext, call: Callable[[], object], kind: type[BaseException], phrase: str
) -> None:
    """The remembered route (collectives/_common.route) skips the lookup, not the checks."""
    _remember_the_routes()
    _check(call, kind, phrase)


@_table(SECURITY_II)
def test_security_retest_escapes(
    ctx: topo.MeshContext, call: Callable[[], object], kind: type[BaseException], phrase: str
) -> None:
    _check(call, kind, phrase)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_recv_on_cuda_without_a_gpu(ctx: topo.MeshContext) -> None:
    with pytest.raises(topo.BackendUnavailableError, match="requires a CUDA GPU"):
        topo.recv((2,), torch.float32, "tp", src=0, device="cuda")


def test_a_failed_queue_leaves_no_shared_memory(ctx: topo.MeshContext) -> None:
    before = set(os.listdir("/dev/shm"))
    for bad in ({"slot_bytes": 2**62}, {"slots": 2**40}):
        with pytest.raises(topo.TopoError):
            _mq(**bad)
    assert set(os.listdir("/dev/shm")) - before == set()


@_table(SPAWN)
def test_spawn(call: Callable[[], object], kind: type[BaseException], phrase: str) -> None:
    _check(call, kind, phrase)


def test_topo_timeout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPO_TIMEOUT", "inf")
    _check(lambda: _activate(DeviceMesh(tp=1)), TopoValue, "TOPO_TIMEOUT requires")


def test_the_table_is_large() -> None:
    rows = MESH_AND_WORLD + ACTIVATION + COLLECTIVES + SPAWN + SECURITY_II
    assert len(rows) >= 50


def test_spawn_refuses_a_script_read_from_stdin(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import topo
        def work():
            return 1
        try:
            topo.spawn(work, topo.DeviceMesh(tp=1), timeout=30)
        except topo.TopoTypeError as error:
            print("REFUSED", error)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-"], input=script, text=True, capture_output=True, timeout=60, env=env
    )
    assert "REFUSED" in done.stdout and "stdin" in done.stdout, done.stdout + done.stderr


def test_error_classes_pickle_and_are_topo_errors() -> None:
    for name in topo.errors.__all__:
        cls = getattr(topo.errors, name)
        assert issubclass(cls, topo.TopoError) or issubclass(cls, UserWarning), name
    error = topo.PortInUseError("x")
    assert isinstance(pickle.loads(pickle.dumps(error)), topo.PortInUseError)


def test_coordinator_timeout_type() -> None:
    with pytest.raises(topo.RendezvousTimeout, match=r"rank\(s\) \[1\]"):
        Coordinator.join(
            World(rank=0, world_size=2),
            timeout=timedelta(seconds=0.5),
            store=torch.distributed.HashStore(),
        )

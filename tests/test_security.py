"""Security: the store listens only where MASTER_ADDR says, nothing read from it is unpickled,
and with a shared secret forged control messages are refused."""

from __future__ import annotations

import ast
import pickle
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import topo
from topo.coordinator import Coordinator
from topo.secret import Sealer
from topo.store import connect_store, listen_socket
from topo.world import World

TOPO = Path(__file__).resolve().parents[1] / "topo"


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(addr)
    return found


def test_hosted_store_listens_on_loopback_only() -> None:
    world = World(rank=0, world_size=1, master_port=0)
    with topo.DeviceMesh(tp=1).activate(world, timeout=10) as ctx:
        port = ctx.coordinator.store.inner.port
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or [::]


def test_bind_everywhere_is_explicit() -> None:
    sock = listen_socket("0.0.0.0", 0)
    try:
        assert _listening(sock.getsockname()[1]) == {"00000000"}
    finally:
        sock.close()


def test_spawned_store_listens_on_loopback_only() -> None:
    # spawn's rank 0 binds through the same helper: loopback, port from the kernel
    sock = listen_socket("127.0.0.1", 0)
    try:
        assert _listening(sock.getsockname()[1]) == {"0100007F"}
    finally:
        sock.close()


def test_no_pickle_loads_of_store_or_socket_data() -> None:
    """Two places call pickle.loads: topo.codec.decode, behind the caller's explicit
    ``allow_pickle=True`` (the object collectives, object transport and MessageQueue use it;
    test_codec.py shows a pickled payload refused without it), and spawn, for its own
    children's results over a multiprocessing pipe (not a network). Nothing in the store,
    rendezvous or any other path does."""
    allowed = {"codec.py", "launch.py"}
    offenders = []
    for path in TOPO.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("loads", "load", "Unpickler")
                and isinstance(node.value, ast.Name)
                and node.value.id in ("pickle", "cPickle", "dill")
            ):
                rel = path.relative_to(TOPO).as_posix()
                if rel not in allowed:
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("raise SystemExit('pickle payload executed')",))


def test_a_pickle_payload_in_the_store_is_never_executed() -> None:
    store = torch.distributed.HashStore()
    coords: dict[int, Coordinator] = {}

    def join(r: int) -> None:
        coords[r] = Coordinator.join(
            World(rank=r, world_size=2), timeout=timedelta(seconds=10), store=store
        )

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    coord = coords[0]
    # an intruder writes a pickle where rank 1's value of the next gather goes
    store.set(coord.key("gather/all", 0, 1), pickle.dumps(_Boom()))
    with pytest.raises(topo.RendezvousError, match="not JSON"):
        coord.all_gather_json("mine")


def test_secret_refuses_forged_broadcast() -> None:
    store = torch.distributed.HashStore()
    secret = b"0123456789abcdef"
    out: dict[int, Any] = {}

    def rank(r: int) -> None:
        try:
            coord = Coordinator.join(
                World(rank=r, world_size=2),
                timeout=timedelta(seconds=10),
                store=store,
                secret=secret,
            )
            if r == 0:
                # an intruder without the secret overwrites rank 0's message first
                key = coord.key("bcast/all", 0, "data")
                store.set(key, b"forged")
                out[0] = "sent"
            else:
                out[1] = coord.broadcast(None, src=0, ranks=(0, 1))
        except topo.TopoError as error:
            out[r] = error

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(out[1], topo.AuthenticationError), out
    assert "TOPO_SECRET" in str(out[1])


def test_a_forged_open_key_ends_both_ranks_with_authentication_error() -> None:
    # The open key is read before the activation's generation (and its alarm key) is known:
    # the rank that refuses it raises the opening's alarm, and rank 0, waiting for it at the
    # join barrier, ends with the same AuthenticationError instead of a bare timeout.
    store = torch.distributed.HashStore()
    secret = b"0123456789abcdef"
    out: dict[int, Any] = {}

    def rank(r: int) -> None:
        try:
            Coordinator.join(
                World(rank=r, world_size=2),
                timeout=timedelta(seconds=3),
                store=store,
                secret=secret,
            )
            out[r] = "joined"
        except topo.TopoError as error:
            out[r] = error

    first = threading.Thread(target=rank, args=(0,))
    first.start()
    store.wait(["topo/open"], timedelta(seconds=10))
    store.set("topo/open", b"12345")  # an intruder without the secret rewrites it
    second = threading.Thread(target=rank, args=(1,))
    second.start()
    for t in (first, second):
        t.join(30)
    assert isinstance(out[1], topo.AuthenticationError), out
    assert "'topo/open'" in str(out[1])
    assert isinstance(out[0], topo.AuthenticationError), out  # not RendezvousTimeout
    assert "a peer refused the value at store key 'topo/open'" in str(out[0])


def test_secret_round_trip_and_tamper() -> None:
    sealer = Sealer(b"0123456789abcdef")
    blob = sealer.seal("k", b"payload")
    assert sealer.open("k", blob) == b"payload"
    with pytest.raises(topo.AuthenticationError):
        sealer.open("other-key", blob)  # a tag is bound to its key: no replay elsewhere
    with pytest.raises(topo.AuthenticationError):
        sealer.open("k", blob[:-1] + b"X")
    assert Sealer(None).open("k", b"raw") == b"raw"


def test_secret_from_env_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPO_SECRET", "0123456789abcdef")
    with topo.DeviceMesh(tp=1).activate(
        World(rank=0, world_size=1, master_port=0), timeout=10
    ) as c:
        assert c.coordinator.sealer.secret == b"0123456789abcdef"
        assert c.coordinator.broadcast(b"x", src=0) == b"x"


def test_connect_names_the_address_of_a_silent_listener() -> None:
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        with pytest.raises(topo.RendezvousTimeout, match=f"127.0.0.1:{port}"):
            connect_store("127.0.0.1", port, timedelta(seconds=1), host=False, bind=None, rank=1)
    finally:
        sock.close()


def test_nccl_unique_id_travels_as_raw_bytes() -> None:
    from topo.communicators.nccl import decode_unique_id, encode_unique_id

    uid = tuple(range(-128, 0))
    data = encode_unique_id(uid)
    assert isinstance(data, bytes) and len(data) == 128
    back = decode_unique_id(data)
    assert [v % 256 for v in back] == [v % 256 for v in uid]
    with pytest.raises(topo.CommunicationError, match="128-byte"):
        decode_unique_id(b"\x80\x03short")


def test_activation_reuses_the_store_of_a_users_init_process_group() -> None:
    """A job that called init_process_group keeps its default group, and topo rendezvouses on
    that group's store instead of binding MASTER_PORT a second time."""
    import torch.distributed as dist

    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=10))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = World(rank=0, world_size=1, master_port=port)
        with topo.DeviceMesh(tp=1).activate(world, timeout=10) as ctx:
            assert ctx.coordinator.store.inner is not None
            assert torch.equal(topo.all_reduce(torch.ones(2), "tp"), torch.ones(2))
        assert dist.is_initialized()  # the user's group survives
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        dist.destroy_process_group()

"""Transport through topo.spawn (gloo): uneven gathers, tensor dicts, objects and the message
queue, checked against references the parent builds from every rank's inputs; the metadata
and packing round trip in-process under hypothesis."""

from __future__ import annotations

import os
from typing import Any

import _transport_fns as fns
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topo
from topo import DeviceMesh
from topo.transport import _wire
from topo.transport.metadata import decode_tree, encode_tree, tree_specs
from topo.transport.tensor_dict import COALESCE_BYTES, _recv_tensors, _send_tensors, plan

SPAWN_TIMEOUT = 120
MESH = DeviceMesh(pp=2, tp=2)


def same(a: Any, b: Any) -> bool:
    """Equal structure, types, dtypes, shapes and values (NaN-free inputs)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        )  # fmt: skip
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def _shm_names() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("topo_mq_")}


@pytest.fixture(scope="module")
def reports() -> list[dict[str, Any]]:
    return topo.spawn(fns.transport_main, MESH, timeout=SPAWN_TIMEOUT)


@pytest.mark.multiprocess
def test_uneven_collectives_match_reference(reports: list[dict[str, Any]]) -> None:
    for rank, got in enumerate(reports):
        for axis in ("tp", "pp"):
            group = MESH.group(axis, rank)
            me = MESH.axis_index(axis, rank)
            for dim in (0, 1):
                want = torch.cat([fns.uneven_input(g, dim) for g in group], dim)
                for method in ("auto", "padded", "broadcast", "p2p"):
                    assert same(got[f"gatherv/{axis}/{dim}/{method}"], want), (rank, axis, dim)
            want = torch.cat([fns.uneven_input(g, 1, torch.bfloat16) for g in group], 1)
            assert same(got[f"gatherv/{axis}/sizes"], want)
            sizes = [1, 3] if axis == "tp" else [0, 4]
            stacked = torch.stack([fns.rs_input(g, 4) for g in group])
            for op, reduced in (("sum", stacked.sum(0)), ("max", stacked.amax(0))):
                want = reduced.split(sizes, 0)[me]
                assert same(got[f"rs/{axis}/{op}"], want), (rank, axis, op)
            want = stacked.sum(0).t().split([2, 2], 1)[me].contiguous()
            assert same(got[f"rs/{axis}/dim1"], want)


@pytest.mark.multiprocess
def test_tensor_dicts_and_objects_match_reference(reports: list[dict[str, Any]]) -> None:
    for rank, got in enumerate(reports):
        assert same(got["bcast/tp"], fns.tensor_dict(MESH.group("tp", rank)[1]))
        assert same(got["bcast/all"], fns.tensor_dict(MESH.group(("pp", "tp"), rank)[2]))
        peers = MESH.group("pp", rank)
        if MESH.axis_index("pp", rank) == 1:
            for ag in (None, "tp"):
                assert same(got[f"p2p/{ag}"], fns.tensor_dict(10)), (rank, ag)
            assert got["obj"] == {"from": peers[0], "data": list(range(peers[0] + 5000))}
        else:
            assert got["obj"] == ("back", peers[1])


@pytest.mark.multiprocess
def test_message_queue_delivers_in_order(reports: list[dict[str, Any]]) -> None:
    msgs = [{"i": i, "pad": "x" * (i * 50_000)} for i in range(12)]
    writer = MESH.group(("pp", "tp"), 0)[1]
    for rank, got in enumerate(reports):
        if rank == writer:
            assert got["mq/auto/kinds"] == ((0, 2, 3), ())
            assert got["mq/socket/kinds"] == ((), (0, 2, 3))
        else:
            for transport in ("auto", "socket"):
                assert got[f"mq/{transport}"] == msgs
                assert got[f"mq/{transport}/raw"] == b"raw"
        assert got["shm_after"] == []


@pytest.mark.multiprocess
def test_bad_input_is_a_clear_error_on_every_rank(reports: list[dict[str, Any]]) -> None:
    e0, e1 = reports[0]["errors"], reports[1]["errors"]  # tp group (0, 1)
    for errors in (e0, e1):
        assert "sum(sizes) == x.shape[0] (5), but got sum([2, 2]) = 4" in errors["rs_sum"]
        assert "one size per rank of axis 'tp' (2), but got 1 sizes" in errors["rs_len"]
        assert "got 3 sizes; pass sizes=None" in errors["gv_sizes"]
        assert (
            errors["gv_mine"].startswith("TopoValueError") and "x.shape[0] (2)" in errors["gv_mine"]
        )
        assert errors["gv_mismatch"].startswith("CollectiveMismatchError")
        assert "d['a']['b'] is a builtins.object" in errors["td_scalar"]
        assert "torch.tensor" in errors["td_scalar"]
        assert "str keys" in errors["td_key"]
        assert "another index than this rank's own" in errors["send_self"]
        assert errors["after"] == "[1.0, 1.0, 1.0]"
        assert errors["after_dtype"] == "[0, 1, 2]"
    # the source raised the encoding error itself; the receiver was told, not left waiting
    assert e0["td_scalar"].startswith("TopoTypeError")
    assert (
        e1["td_scalar"].startswith("TopoValueError") and "sending rank (index 0)" in e1["td_scalar"]
    )
    assert (
        e0["send_bad"].startswith("TopoTypeError") and "d['x'] is a builtins.set" in e0["send_bad"]
    )
    assert e1["send_bad"].startswith("TopoValueError") and "builtins.set" in e1["send_bad"]
    assert e0["td_dtype"] == "no error"
    assert (
        e1["td_dtype"].startswith("TopoTypeError")
        and "'float16', which this torch" in e1["td_dtype"]
    )
    assert "index 1 (rank 1, read 0 of 2 chunks) did not read" in e0["mq_full"]
    assert e0["mq_full"].startswith("CommunicationTimeout")
    assert "must be called by the writer" in e1["mq_role"]
    assert e1["mq_empty"].startswith("CommunicationTimeout") and "0.2 s" in e1["mq_empty"]


@pytest.mark.multiprocess
def test_kill_9_of_the_writer_and_a_reader_leaves_no_shared_memory() -> None:
    before = _shm_names()
    with pytest.raises(topo.RankFailedError, match=r"rank [01] "):
        topo.spawn(fns.mq_kill_main, DeviceMesh(tp=3), (0, 1), timeout=SPAWN_TIMEOUT)
    assert _shm_names() - before == set()


# ------------------------------------------------------------------- in-process, hypothesis

_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16,
           torch.complex64, torch.uint8, torch.float16]  # fmt: skip

_tensors = st.builds(
    lambda dtype, shape, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                * 10).to(dtype),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 4), min_size=0, max_size=3),
    st.integers(0, 1000),
)  # fmt: skip
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=5),
    st.floats(allow_nan=False),
)  # fmt: skip
_values = st.recursive(
    st.one_of(_scalars, _tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=12,
)


def _round_trip(d: dict[str, Any], n_split: int) -> Any:
    """Encode, move by the plan through in-memory 'messages' (n senders of the same dict
    for a split), and decode, as the two sides of send/recv_tensor_dict do."""
    tree, tensors = encode_tree(d, "test")
    meta = _wire.loads(_wire.dumps({"tree": tree}), "test")["tree"]
    specs, unknown = tree_specs(meta, "test")
    assert unknown is None
    steps = plan([(t.dtype, tuple(t.shape), t.device.type) for t in tensors], n_split)
    sent: list[list[torch.Tensor]] = []
    for slot in range(n_split):
        messages: list[torch.Tensor] = []
        _send_tensors(tensors, steps, lambda kind, x, m=messages: m.append(x.clone()), slot)
        sent.append(messages)
    position = iter(range(10**6))
    received: list[int] = []

    def take(kind: str, like: torch.Tensor) -> torch.Tensor:
        i = next(position)
        received.append(i)
        got = sent[0][i]
        assert got.shape == like.shape and got.dtype == like.dtype
        return got

    def gather(kind: str, part: torch.Tensor) -> torch.Tensor:
        i = received[-1]
        return torch.stack([sent[k][i] for k in range(n_split)])

    out = _recv_tensors(specs, steps, take, gather, lambda kind: torch.device("cpu"))
    assert next(position) == sum(len(m) for m in sent[:1])  # every message taken once
    return decode_tree(meta, out)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _values, max_size=4), st.sampled_from([1, 2, 3]))
def test_metadata_and_packing_round_trip(d: dict[str, Any], n_split: int) -> None:
    assert same(_round_trip(d, n_split), d)


def test_plan_coalesces_small_tensors_and_moves_big_ones_alone() -> None:
    small = (torch.float32, (10,), "cpu")
    big = (torch.float32, (COALESCE_BYTES // 4,), "cpu")
    steps = plan([small, big, small, (torch.int64, (3,), "cpu")], 1)["cpu"]
    assert [i for i, _ in steps.packed] == [0, 2, 3] and steps.single == [1]
    assert all(at % _wire.ALIGN == 0 for _, at in steps.packed)
    split = plan([small, (torch.float32, (7,), "cpu")], 2)["cpu"]
    assert [i for i, *_ in split.split] == [0] and [i for i, _ in split.packed] == [1]


def test_unknown_dtype_from_a_newer_sender_is_a_clear_error() -> None:
    specs, error = tree_specs({"d": [["x", {"t": ["float4_e9", [2], "cpu", 2]}]]}, "recv")
    assert specs == [(torch.int16, (2,), "cpu")]  # same bytes: the receiver drains them
    assert isinstance(error, TypeError) and "dtype 'float4_e9', which this torch" in str(error)
    with pytest.raises(TypeError, match="dtype 'float4_e9', which this torch"):
        tree_specs({"d": [["x", {"t": ["float4_e9", [2], "cpu", 3]}]]}, "recv")
    with pytest.raises(topo.CollectiveMismatchError, match="cannot read"):
        tree_specs({"zz": 1}, "recv_tensor_dict")
    with pytest.raises(topo.CollectiveMismatchError, match="not topo metadata"):
        _wire.loads(b"\x80\x04pickle", "recv_tensor_dict")


# ------------------------------------------------------- the NCCL path, against a fake cupy


def test_uneven_collectives_on_the_nccl_communicator(monkeypatch: pytest.MonkeyPatch) -> None:
    """gatherv/scatterv drive NcclCommunicator exactly as gloo (padded all_gather, per-rank
    broadcasts, padded reduce_scatter); a one-rank fake NCCL moves the bytes (no GPU here)."""
    from test_nccl import _fake_communicator

    from topo.collectives.uneven import exchange_sizes, gatherv, scatterv
    from topo.communicators.nccl_types import NCCL_DTYPES

    c, comm, _ = _fake_communicator(monkeypatch)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert exchange_sizes(c, x, 1, "tp", "all_gatherv") == [4]
    assert comm.calls[-1] == ("allGather", 2, NCCL_DTYPES[torch.int64])
    assert same(gatherv(c, x, 1, [4], "padded"), x)
    assert comm.calls[-1] == ("allGather", 12, NCCL_DTYPES[torch.float32])
    assert same(gatherv(c, x, 0, [3], "broadcast"), x)
    assert comm.calls[-1] == ("broadcast", 12, NCCL_DTYPES[torch.float32], 0)
    assert same(gatherv(c, x, 0, [3], "p2p"), x)  # a one-rank group sends nothing
    y = scatterv(c, x.to(torch.bfloat16), 0, [3], "max")
    assert same(y, x.to(torch.bfloat16))
    assert comm.calls[-1][:2] == ("reduceScatter", 12)


# --------------------------------------------------------- the socket path's authentication


def _handshake(
    server_secret: bytes, client_secret: bytes, index: int, wait: float = 1.5
) -> tuple[Any, Any]:
    """A writer accepting readers 1 and 2 for ``wait`` seconds, and one reader ``index``."""
    import socket
    import threading
    import time

    from topo.transport._links import accept_readers, client_handshake

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: dict[str, Any] = {}

    def client() -> None:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            got["client"] = client_handshake(conn, index, client_secret)
        except OSError as error:  # the writer hung up on an impostor
            got["client"] = error
        finally:
            conn.close()

    thread = threading.Thread(target=client)
    thread.start()
    proven, _ = accept_readers(server, server_secret, {1, 2}, time.monotonic() + wait)
    for conn in proven.values():
        conn.close()
    server.close()
    thread.join(10)
    return (next(iter(proven)) if proven else None), got["client"]


def test_socket_readers_and_writer_authenticate_each_other() -> None:
    secret = b"s" * 32
    assert _handshake(secret, secret, 2) == (2, True)
    # a reader with the wrong secret is refused, and learns the writer is not its writer
    server, client = _handshake(secret, b"x" * 32, 2)
    assert server is None and client is False
    # the right secret but an index the writer does not wait for
    server, _ = _handshake(secret, secret, 3)
    assert server is None


def test_writer_drops_peers_that_do_not_speak_the_protocol_without_waiting_for_them() -> None:
    """Silent connections and a peer speaking HTTP, queued ahead of the real reader: each is
    dropped on its own deadline while the reader's handshake goes through at once."""
    import socket
    import threading
    import time

    from topo.transport._links import HANDSHAKE_SECONDS, accept_readers, client_handshake

    secret = b"s" * 32
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    http = socket.create_connection(("127.0.0.1", port))
    http.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 8)
    answered: dict[str, Any] = {}

    def reader() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            answered["ok"] = client_handshake(conn, 1, secret)

    thread = threading.Thread(target=reader)
    started = time.monotonic()
    thread.start()
    proven, missing = accept_readers(server, secret, {1}, time.monotonic() + 30)
    took = time.monotonic() - started
    thread.join(10)
    assert set(proven) == {1} and missing == set() and answered["ok"] is True
    assert took < HANDSHAKE_SECONDS  # nobody waited for the silent ones
    for conn in [*silent, http, *proven.values(), server]:
        conn.close()


@pytest.mark.multiprocess
def test_a_rank_that_fails_before_moving_data_tells_its_peers() -> None:
    """Sparse or self-referencing values, a bad all_gather_axis, a missing load, a wrong role:
    every rank raises a TopoError at once, nobody waits out the (60 s) timeout."""
    reports = topo.spawn(fns.prompt_failures, DeviceMesh(tp=2), timeout=200, activation_timeout=60)
    for rank, report in enumerate(reports):
        for name, (outcome, seconds) in report.items():
            assert outcome != "no error", (rank, name)
            assert outcome.split(":")[0].endswith("Error"), (rank, name, outcome)
            assert "Timeout" not in outcome.split(":")[0], (rank, name, outcome)
            assert seconds < 20, (rank, name, outcome, seconds)
    assert "dense" in reports[0]["tensor dict sparse"][0]
    assert "contains itself" in reports[0]["tensor dict cycle"][0]
    assert "could not send its tensor dict" in reports[1]["tensor dict cycle"][0]
    assert "dense tensors" in reports[1]["send_weights sparse"][0]
    assert "unknown axis 'zz'" in reports[1]["send_tensor_dict bad axis"][0]
    assert "callable" in reports[0]["receive_weights load None"][0]
    assert "index 1 (rank 1) called it" in reports[1]["send_weights on a receiver"][0]
    assert "must not be called by the sender" in reports[1]["receive_weights on the sender"][0]

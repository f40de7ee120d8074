"""Check mode: before each collective the ranks of a group compare what they are about to do.

``mesh.activate(check=True)`` (or ``TOPO_CHECK=1``) wraps every communicator in a
:class:`CheckedCommunicator`. Before each operation it all-gathers a fixed-size record of 18
int64 values (sequence number, operation, axis, shape, dtype, device type, reduce op, root)
over the group's own CPU communicator, unwrapped (a :class:`CheckChannel`: also for CUDA
groups, so a rank that passes a CPU tensor where the others pass CUDA ones is caught too).
Every rank sees the same records, so on a mismatch every rank of the group raises
:class:`topo.CollectiveMismatchError` naming the ranks and the differing fields, instead of
a crash inside gloo, a hang or silently wrong values. Point-to-point exchanges (send/recv,
ppermute, shift) swap records with each peer instead, counted per peer, since the rest of the
group may not take part: what each end sends against what the other expects, so both ends of
a mismatched pair raise. The uneven all-to-all also all-gathers every rank's send and receive
sizes and checks them pairwise. The record's content never
depends on tensor values, and the check touches no collective: it lives in the communicator
layer.

Cost: one extra small all-gather per operation (on CPU, through the group's CPU backend),
about doubling the latency of small collectives; nothing for large tensors beyond that.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from topo.communicators.alltoallv import all_to_allv_dim0, sizes_mismatch
from topo.communicators.base import REDUCE_OPS, Communicator, ReduceOp
from topo.errors import CollectiveMismatchError

__all__ = ["CheckChannel", "CheckedCommunicator", "mismatch_message"]

#: A value that matches anything (a record with no tensor, as a barrier's).
ANY = "(any)"

OPERATIONS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all",
    "exchange",
    "barrier",
    "all_to_allv",
)
_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64",
    "bool", "complex64", "complex128", "complex32", "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
)  # fmt: skip
_DTYPES: tuple[torch.dtype, ...] = tuple(
    d for d in (getattr(torch, n, None) for n in _DTYPE_NAMES) if isinstance(d, torch.dtype)
)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta", "privateuseone")
_MAGIC = 0x70C0C4EC
_MAX_DIMS = 8
_NO_TENSOR = -2
# magic, seq, op, axis, ndim, dims[8], rest-of-shape crc, dtype, device, reduce op, root
RECORD_SIZE = 5 + _MAX_DIMS + 5


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) + (1 << 40)


def _code(value: Any, table: Sequence[Any]) -> int:
    try:
        return table.index(value)
    except ValueError:
        return _crc(str(value))


def _name(code: int, table: Sequence[Any], what: str) -> str:
    if 0 <= code < len(table):
        value = table[code]
        return str(value).removeprefix("torch.")
    return f"{what} #{code:x}"


def encode(
    seq: int,
    operation: str,
    axis: str,
    device_type: str,
    x: torch.Tensor | None,
    reduce_op: ReduceOp | None = None,
    root: int | None = None,
) -> torch.Tensor:
    """The record a rank contributes, as an int64 CPU tensor of :data:`RECORD_SIZE` values.

    Example::

        encode(0, "all_reduce", "tp", "cpu", torch.ones(2), "sum").shape   # (18,)
    """
    dims = [-1] * _MAX_DIMS
    if x is None:
        ndim, rest, dtype = _NO_TENSOR, 0, _NO_TENSOR
    else:
        ndim, shape = x.dim(), tuple(x.shape)
        dims[: min(ndim, _MAX_DIMS)] = shape[:_MAX_DIMS]
        rest = _crc(repr(shape[_MAX_DIMS:])) if ndim > _MAX_DIMS else 0
        dtype = _code(x.dtype, _DTYPES)
    values = [
        _MAGIC,
        seq,
        _code(operation, OPERATIONS),
        _crc(axis),
        ndim,
        *dims,
        rest,
        dtype,
        _code(device_type, _DEVICE_TYPES),
        -1 if reduce_op is None else REDUCE_OPS.index(reduce_op),
        -1 if root is None else root,
    ]
    return torch.tensor(values, dtype=torch.int64, device="cpu")  # for the gloo channel


def decode(row: Sequence[int], axis: str) -> dict[str, object]:
    """A gathered record as readable fields (the inverse of :func:`encode`).

    Example::

        decode(encode(0, "barrier", "tp", "cpu", None).tolist(), "tp")["operation"]  # 'barrier'
    """
    if len(row) != RECORD_SIZE or row[0] != _MAGIC:
        return {"operation": "(not a check-mode record: is check mode on for every rank?)"}
    seq, op, axis_code, ndim = row[1:5]
    dims = row[5 : 5 + _MAX_DIMS]
    rest, dtype, device, reduce_code, root = row[5 + _MAX_DIMS :]
    shape: object
    if ndim == _NO_TENSOR:
        shape = dtype_name = ANY
    else:
        shape = tuple(dims[: min(ndim, _MAX_DIMS)])
        if ndim > _MAX_DIMS:
            shape = f"{shape} + … ({ndim}-d, tail #{rest:x})"
        dtype_name = _name(dtype, _DTYPES, "dtype")
    return {
        "sequence number": seq,
        "operation": _name(op, OPERATIONS, "operation"),
        "axis": axis if axis_code == _crc(axis) else f"axis #{axis_code:x}",
        "shape": shape,
        "dtype": dtype_name,
        "device type": _name(device, _DEVICE_TYPES, "device"),
        "reduce op": "-" if reduce_code < 0 else _name(reduce_code, REDUCE_OPS, "op"),
        "root": "-" if root < 0 else root,
    }


def mismatch_message(
    operation: str, label: str, ranks: Sequence[int], records: Sequence[Mapping[str, object]]
) -> str | None:
    """``None`` when every rank's record agrees (``ANY`` matches anything); else a message
    naming each differing field with the global ranks that hold each value.

    Example::

        mismatch_message("all_reduce", "axis 'tp' group (0, 1)", (0, 1),
                         [{"shape": (2,)}, {"shape": (3,)}])
        # "all_reduce on axis 'tp' group (0, 1): the ranks disagree on shape: rank 0 has (2,),
        #  rank 1 has (3,); ..."
    """
    fields = list(dict.fromkeys(field for record in records for field in record))
    parts = []
    for field in fields:
        holders: dict[str, list[int]] = {}
        for rank, record in zip(ranks, records, strict=True):
            value = record.get(field, "(missing)")
            if value != ANY:
                holders.setdefault(str(value), []).append(rank)
        if len(holders) > 1:
            ordered = sorted(holders.items(), key=lambda item: item[1][0])
            has = ", ".join(
                f"rank {who[0]} has {value}" if len(who) == 1 else f"ranks {who} have {value}"
                for value, who in ordered
            )
            parts.append(f"{field}: {has}")
    if not parts:
        return None
    return (
        f"{operation} on {label}: the ranks disagree on {'; '.join(parts)}. Every rank of the "
        f"group must call the same collectives in the same order, with the same shape, dtype, "
        f"device type, reduce op and src/dst"
    )


class CheckChannel:
    """The unwrapped CPU communicator of one group (or send/recv pair) that carries the
    check-mode records, and the group's count of checked operations.

    Example::

        channel = CheckChannel(lambda: gloo_comm, axis="tp")
        channel.check("all_reduce", "cpu", x, "sum")
    """

    def __init__(self, get_comm: Callable[[], Communicator], axis: str) -> None:
        self._get_comm = get_comm
        self._comm: Communicator | None = None
        self.axis = axis
        self.seq = 0
        self._p2p_seq: dict[int, int] = {}

    @property
    def comm(self) -> Communicator:
        """The CPU communicator, created on first use (by every rank of the group at once)."""
        if self._comm is None:
            self._comm = self._get_comm()
        return self._comm

    def check(
        self,
        operation: str,
        device_type: str,
        x: torch.Tensor | None,
        reduce_op: ReduceOp | None = None,
        root: int | None = None,
    ) -> None:
        """All-gather this rank's record; raise :class:`CollectiveMismatchError` on every rank
        when the records differ."""
        comm = self.comm
        record = encode(self.seq, operation, self.axis, device_type, x, reduce_op, root)
        self.seq += 1
        rows = comm.all_gather(record).tolist()
        records = [decode(row, self.axis) for row in rows]
        message = mismatch_message(operation, comm.label, comm.ranks, records)
        if message is not None:
            raise CollectiveMismatchError(f"check mode: {message}")

    def check_all_to_allv(
        self,
        device_type: str,
        x: torch.Tensor,
        send_sizes: Sequence[int],
        recv_sizes: Sequence[int],
    ) -> None:
        """The uneven all-to-all: :meth:`check`'s record (its shape without the rows, which
        differ by design), then, once the ranks agree on it, every rank's sizes in a second
        small all-gather; on sizes that disagree pairwise (index ``i``'s ``send_sizes[j]``
        against index ``j``'s ``recv_sizes[i]``) every rank of the group raises."""
        comm = self.comm
        record = encode(self.seq, "all_to_allv", self.axis, device_type, x.narrow(0, 0, 0))
        self.seq += 1
        records = []
        for row in comm.all_gather(record).tolist():
            fields = decode(row, self.axis)
            shape = fields.pop("shape", None)
            fields["row shape"] = shape[1:] if isinstance(shape, tuple) else shape
            records.append(fields)
        message = mismatch_message("all_to_allv", comm.label, comm.ranks, records)
        if message is not None:
            raise CollectiveMismatchError(f"check mode: {message}")
        n = len(send_sizes)
        table = comm.all_gather(
            torch.tensor([*send_sizes, *recv_sizes], dtype=torch.int64, device="cpu")
        )
        rows = table.tolist()
        sends, recvs = [row[:n] for row in rows], [row[n:] for row in rows]
        message = sizes_mismatch("all_to_allv", comm.label, comm.ranks, sends, recvs)
        if message is not None:
            raise CollectiveMismatchError(f"check mode: {message}")

    def check_exchange(
        self,
        device_type: str,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        """Point-to-point: swap records with each peer only (the rest of the group may not
        take part), counted per peer: what this rank sends the peer and what it expects from
        it. A send the peer does not expect in that shape and dtype, or does not expect at
        all while it exchanges something else with this rank, raises at both ends of the
        pair; a peer that exchanges nothing with this rank swaps no record (the exchange then
        times out naming it, as without check mode)."""
        sent = {peer: t for peer, t in reversed(sends)}
        expected = {peer: t for peer, t in reversed(recvs)}
        peers = sorted(set(sent) | set(expected))
        if not peers:
            return
        comm = self.comm
        mine, theirs = [], []
        for peer in peers:
            seq = self._p2p_seq.get(peer, 0)
            self._p2p_seq[peer] = seq + 1
            out = encode(seq, "exchange", self.axis, device_type, sent.get(peer))
            into = encode(seq, "exchange", self.axis, device_type, expected.get(peer))
            record = torch.cat([out, into])
            mine.append((peer, record))
            theirs.append((peer, torch.empty_like(record)))
        comm.exchange(mine, theirs)
        me = comm.index
        for (peer, record), (_, got) in zip(mine, theirs, strict=True):
            mine_out, mine_in = _p2p_fields(record, self.axis)
            their_out, their_in = _p2p_fields(got, self.axis)
            directions = [(me, peer, mine_out, their_in), (peer, me, their_out, mine_in)]
            directions.sort(key=lambda d: comm.ranks[d[0]])  # both ends report the same first
            for src, dst, a, b in directions:
                ranks = (comm.ranks[src], comm.ranks[dst])
                records = (a, b) if ranks[0] < ranks[1] else (b, a)
                message = mismatch_message(
                    f"send/recv (rank {ranks[0]} to rank {ranks[1]})",
                    comm.label,
                    sorted(ranks),
                    records,
                )
                if message is not None:
                    raise CollectiveMismatchError(f"check mode: {message}")


def _p2p_fields(record: torch.Tensor, axis: str) -> tuple[dict[str, object], dict[str, object]]:
    """A peer's two point-to-point records (what it sends, what it expects) as fields; no
    tensor reads ``nothing`` there (it must meet no tensor on the other end)."""
    halves = []
    for row in (record[:RECORD_SIZE].tolist(), record[RECORD_SIZE:].tolist()):
        fields = decode(row, axis)
        if fields.get("shape") == ANY:
            fields["shape"] = fields["dtype"] = "nothing"
        halves.append(fields)
    return halves[0], halves[1]


class CheckedCommunicator:
    """A communicator that runs :meth:`CheckChannel.check` before every operation of
    ``inner`` (see the module docstring).

    Example::

        comm = CheckedCommunicator(gloo_comm, CheckChannel(lambda: gloo_comm, "tp"), "cpu")
        comm.all_reduce(torch.ones(2), "sum")
    """

    def __init__(self, inner: Communicator, channel: CheckChannel, device_type: str) -> None:
        self.inner = inner
        self.channel = channel
        self.device_type = device_type
        self.ranks = inner.ranks
        self.index = inner.index
        self.label = inner.label

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _check(
        self,
        operation: str,
        x: torch.Tensor | None,
        reduce_op: ReduceOp | None = None,
        root: int | None = None,
    ) -> None:
        self.channel.check(operation, self.device_type, x, reduce_op, root)

    def all_reduce(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        self._check("all_reduce", x, op)
        return self.inner.all_reduce(x, op)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._check("all_gather", x)
        return self.inner.all_gather(x)

    def reduce_scatter(self, x: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        self._check("reduce_scatter", x, op)
        return self.inner.reduce_scatter(x, op)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self._check("broadcast", x, root=src)
        return self.inner.broadcast(x, src)

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        self._check("gather", x, root=dst)
        return self.inner.gather(x, dst)

    def scatter(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self._check("scatter", x, root=src)
        return self.inner.scatter(x, src)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        self._check("all_to_all", x)
        return self.inner.all_to_all(x)

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        self.channel.check_exchange(self.device_type, sends, recvs)
        self.inner.exchange(sends, recvs)

    def all_to_allv_dim0(
        self, x: torch.Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int]
    ) -> torch.Tensor:
        """The uneven all-to-all, checked first (:meth:`CheckChannel.check_all_to_allv`)."""
        self.channel.check_all_to_allv(self.device_type, x, send_sizes, recv_sizes)
        return all_to_allv_dim0(self.inner, x, send_sizes, recv_sizes)

    def barrier(self) -> None:
        self._check("barrier", None)
        self.inner.barrier()

    def close(self, abort: bool = False) -> None:
        self.inner.close(abort=abort)

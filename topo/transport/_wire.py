"""Bytes over communicators, and tensors packed into one byte buffer.

Variable-length bytes travel in a fixed-size first message (length + as much payload as fits)
and, only when they do not fit, one more message with the rest: a small control message costs
one collective, not two. Packing lays tensors out in one ``uint8`` buffer at aligned offsets,
so each unpacks as a view (no copy).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import torch

from topo.communicators.base import Communicator, plain
from topo.errors import CollectiveMismatchError, TopoTypeError

#: Bytes of the first message (8 of them the length).
HEADER_BYTES = 4096
#: Offsets of packed tensors are multiples of this (the largest itemsize: complex128).
ALIGN = 16

_LENGTH = struct.Struct("<q")


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def _frame(data: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first message (length + head of ``data``) and the rest, if any."""
    head = bytearray(HEADER_BYTES)
    _LENGTH.pack_into(head, 0, len(data))
    first = min(len(data), HEADER_BYTES - _LENGTH.size)
    head[_LENGTH.size : _LENGTH.size + first] = data[:first]
    rest = None
    if len(data) > first:
        rest = torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8)
    return torch.frombuffer(head, dtype=torch.uint8), rest


def _unframe(head: torch.Tensor) -> tuple[bytes, int]:
    raw = head.numpy().tobytes()
    (length,) = _LENGTH.unpack_from(raw, 0)
    first = min(length, HEADER_BYTES - _LENGTH.size)
    return raw[_LENGTH.size : _LENGTH.size + first], length - first


def broadcast_bytes(comm: Communicator, data: bytes | None, root: int) -> bytes:
    """``data`` of index ``root`` on every rank of ``comm`` (a CPU communicator)."""
    if comm.index == root:
        assert data is not None
        head, rest = _frame(data)
        comm.broadcast(head, root)
        if rest is not None:
            comm.broadcast(rest, root)
        return data
    head = torch.empty(HEADER_BYTES, dtype=torch.uint8, device="cpu")
    got, missing = _unframe(comm.broadcast(head, root))
    if missing:
        rest = torch.empty(missing, dtype=torch.uint8, device="cpu")
        got += comm.broadcast(rest, root).numpy().tobytes()
    return got


def send_bytes(comm: Communicator, data: bytes, peer: int) -> None:
    """Send ``data`` to index ``peer`` of ``comm`` (which calls :func:`recv_bytes`)."""
    head, rest = _frame(data)
    comm.exchange([(peer, head)], [])
    if rest is not None:
        comm.exchange([(peer, rest)], [])


def recv_bytes(comm: Communicator, peer: int) -> bytes:
    """Bytes sent by index ``peer`` of ``comm`` with :func:`send_bytes`."""
    head = torch.empty(HEADER_BYTES, dtype=torch.uint8, device="cpu")
    comm.exchange([], [(peer, head)])
    got, missing = _unframe(head)
    if missing:
        rest = torch.empty(missing, dtype=torch.uint8, device="cpu")
        comm.exchange([], [(peer, rest)])
        got += rest.numpy().tobytes()
    return got


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (metadata never travels pickled)."""
    return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes, what: str) -> Any:
    """JSON bytes back to a value; garbage is a :class:`CollectiveMismatchError` (the peer
    called a different operation)."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CollectiveMismatchError(
            f"{what} received {len(data)} bytes that are not topo metadata (JSON); the sending "
            f"rank must call the matching operation (e.g. send_tensor_dict for recv_tensor_dict)"
        ) from None


# ------------------------------------------------------------------------------- packing


def byte_view(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat ``uint8`` view (a 0-d or empty tensor too).

    It goes through a trailing dim of 1: a one-element tensor counts as contiguous with any
    stride (``torch.arange(6.0)[::2][:1]``), and ``view(uint8)`` requires the last stride to
    be 1."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device)
    return flat.unsqueeze(-1).view(torch.uint8).reshape(-1)


def layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Aligned offsets of parts of ``nbytes`` laid end to end, and the total length."""
    offsets, at = [], 0
    for size in nbytes:
        offsets.append(at)
        at = align(at + size)
    return offsets, at


def pack_into(
    buffer: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: Sequence[int]
) -> None:
    """Copy each tensor's bytes into ``buffer`` (``uint8``) at its offset."""
    for t, at in zip(tensors, offsets, strict=True):
        raw = byte_view(plain(t))
        buffer[at : at + raw.numel()].copy_(raw, non_blocking=True)


def unpack(
    buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]
) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` stored at ``offset`` of ``buffer``: a view."""
    count = 1
    for s in shape:
        count *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = buffer[offset : offset + count * itemsize]
    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=buffer.device)
    return raw.view(dtype).reshape(tuple(shape))


# --------------------------------------------------------------------------------- dtypes

_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"`` (the name travels in JSON)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object, what: str) -> torch.dtype:
    """The torch dtype called ``name``; an unknown one (a newer torch on the sender) is a
    clear error listing the known ones."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise TopoTypeError(
            f"{what} received a tensor of dtype {name!r}, which this torch ({torch.__version__}) "
            f"does not know; known dtypes: {', '.join(sorted(_DTYPES))}. Use the same torch "
            f"version on both sides or cast the tensor before sending"
        )
    return dtype

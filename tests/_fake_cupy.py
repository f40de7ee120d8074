"""A fake ``cupy`` (with ``cupy.cuda.nccl``) as strict as the real one, for tests without a GPU.

It models what topo calls, the way cupy's Cython signatures parse it (checked against
cupy-cuda12x 14.2 on a CPU machine, and cupy 13's ``nccl.pyx``):

- ``get_unique_id()`` returns ``bytes`` (cupy >= 14) or a tuple of 128 C ``char`` values
  (cupy 13), and ``NcclCommunicator(ndev, commId, rank)`` takes exactly that type: ``bytes`` of
  length 128 (a tuple raises ``TypeError: Argument 'commId' has incorrect type (expected bytes,
  got tuple)``, another length ``ValueError``) or a tuple (``bytes`` raises the mirror
  ``TypeError``, a wrong length ``AssertionError``, a value outside ``char`` ``OverflowError``);
- every pointer (``intptr_t``), count (``size_t``) and enum (``int``) argument must be a Python
  ``int`` (``bool`` too; a float, ``None`` or a numpy integer raise ``TypeError: an integer is
  required``), in range (a negative count ``OverflowError``);
- dtype and op codes outside NCCL's enums, a peer or root outside the communicator, and any
  call after ``destroy``/``abort`` raise ``NcclError`` (NCCL's ``ncclInvalidArgument``);
  ``groupEnd`` without ``groupStart`` raises ``NcclError`` (``ncclInvalidUsage``).

A one-rank communicator moves bytes with ``memmove`` (CPU tensors stand in for CUDA ones); a
communicator of several ranks records its calls and moves nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import types
from typing import Any

import pytest

#: NCCL's dtype enum (nccl.h) → bytes per element.
DTYPE_BYTES = {0: 1, 1: 1, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 8, 9: 2}
#: NCCL's reduction ops (sum, prod, max, min, avg).
OPS = frozenset(range(5))

_SIGNED_CHAR = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}


class NcclError(RuntimeError):
    """cupy_backends.cuda.libs.nccl.NcclError (a RuntimeError with NCCL's status code)."""

    def __init__(self, text: str, status: int = 3) -> None:
        self.status = status
        super().__init__(text)


def _invalid_argument() -> NcclError:
    return NcclError("NCCL_ERROR_INVALID_ARGUMENT: invalid argument", 4)


def _integer(value: object, kind: str) -> int:
    """Cython's conversion of ``value`` to the C type ``kind``."""
    if not isinstance(value, int):
        raise TypeError("an integer is required")
    bits = {"int": 32, "intptr_t": 64, "size_t": 64}[kind]
    if kind == "size_t":
        if value < 0:
            raise OverflowError("can't convert negative value to size_t")
        if value >= 1 << bits:
            raise OverflowError("Python int too large to convert to C size_t")
    elif not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise OverflowError(f"Python int too large to convert to C {kind}")
    return int(value)


class FakeNcclCommunicator:
    """``cupy.cuda.nccl.NcclCommunicator`` with cupy's argument parsing."""

    def __init__(self, ndev: object, commId: object, rank: object) -> None:
        module = self._module
        if module.major >= 14:
            if type(commId) is not bytes:
                raise TypeError(
                    f"Argument 'commId' has incorrect type (expected bytes, got "
                    f"{type(commId).__name__})"
                )
            if len(commId) != 128:
                raise ValueError(f"commId length {len(commId)} != 128.")
        else:
            if type(commId) is not tuple:
                raise TypeError(
                    f"Argument 'commId' has incorrect type (expected tuple, got "
                    f"{type(commId).__name__})"
                )
            assert len(commId) == 128
            low, high = (-128, 127) if _SIGNED_CHAR else (0, 255)
            for value in commId:
                if not isinstance(value, int):
                    raise TypeError("an integer is required")
                if not low <= value <= high:
                    raise OverflowError("value too large to convert to char")
        self.ndev = _integer(ndev, "int")
        self.rank = _integer(rank, "int")
        if not 0 <= self.rank < self.ndev:
            raise _invalid_argument()
        self.comm_id = commId
        self.calls: list[tuple[object, ...]] = []
        self.closed = False
        self.pending: list[tuple[int, int, int]] = []
        module.created.append(self)

    _module: Any = None  # the fake module this class belongs to (set by make_nccl)

    # -------------------------------------------------------------- parsing

    def _live(self) -> None:
        if self.closed:
            raise _invalid_argument()

    def _dtype(self, value: object) -> int:
        code = _integer(value, "int")
        if code not in DTYPE_BYTES:
            raise _invalid_argument()
        return code

    def _op(self, value: object) -> int:
        code = _integer(value, "int")
        if code not in OPS:
            raise _invalid_argument()
        return code

    def _peer(self, value: object) -> int:
        peer = _integer(value, "int")
        if not 0 <= peer < self.ndev:
            raise _invalid_argument()
        return peer

    def _move(self, dst: int, src: int, count: int, dtype: int) -> None:
        if self.ndev == 1 and count:
            ctypes.memmove(dst, src, count * DTYPE_BYTES[dtype])

    # ----------------------------------------------------------- collectives

    def allReduce(self, sendbuf: object, recvbuf: object, count: object, datatype: object,
                  op: object, stream: object) -> None:  # fmt: skip
        s, r = _integer(sendbuf, "intptr_t"), _integer(recvbuf, "intptr_t")
        n, dt, o = _integer(count, "size_t"), self._dtype(datatype), self._op(op)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("allReduce", n, dt, o))
        self._move(r, s, n, dt)

    def allGather(self, sendbuf: object, recvbuf: object, count: object, datatype: object,
                  stream: object) -> None:  # fmt: skip
        s, r = _integer(sendbuf, "intptr_t"), _integer(recvbuf, "intptr_t")
        n, dt = _integer(count, "size_t"), self._dtype(datatype)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("allGather", n, dt))
        self._move(r, s, n, dt)

    def reduceScatter(self, sendbuf: object, recvbuf: object, recvcount: object,
                      datatype: object, op: object, stream: object) -> None:  # fmt: skip
        s, r = _integer(sendbuf, "intptr_t"), _integer(recvbuf, "intptr_t")
        n, dt, o = _integer(recvcount, "size_t"), self._dtype(datatype), self._op(op)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("reduceScatter", n, dt, o))
        self._move(r, s, n, dt)

    def broadcast(self, sendbuff: object, recvbuff: object, count: object, datatype: object,
                  root: object, stream: object) -> None:  # fmt: skip
        s, r = _integer(sendbuff, "intptr_t"), _integer(recvbuff, "intptr_t")
        n, dt, root_ = _integer(count, "size_t"), self._dtype(datatype), self._peer(root)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("broadcast", n, dt, root_))
        self._move(r, s, n, dt)

    def send(self, sendbuf: object, count: object, datatype: object, peer: object,
             stream: object) -> None:  # fmt: skip
        s = _integer(sendbuf, "intptr_t")
        n, dt, p = _integer(count, "size_t"), self._dtype(datatype), self._peer(peer)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("send", n, dt, p))
        self.pending.append((s, n, dt))

    def recv(self, recvbuf: object, count: object, datatype: object, peer: object,
             stream: object) -> None:  # fmt: skip
        r = _integer(recvbuf, "intptr_t")
        n, dt, p = _integer(count, "size_t"), self._dtype(datatype), self._peer(peer)
        _integer(stream, "intptr_t")
        self._live()
        self.calls.append(("recv", n, dt, p))
        if self.ndev == 1 and self.pending:
            src, sent, sent_dtype = self.pending.pop(0)
            if sent * DTYPE_BYTES[sent_dtype] != n * DTYPE_BYTES[dt]:
                raise _invalid_argument()
            self._move(r, src, n, dt)

    def check_async_error(self) -> None:
        self._live()

    def destroy(self) -> None:
        self.calls.append(("destroy",))
        self.closed = True

    def abort(self) -> None:
        self.calls.append(("abort",))
        self.closed = True


def make_nccl(major: int = 14, version: int = 22703) -> types.ModuleType:
    """A fake ``cupy.cuda.nccl`` module of cupy ``major`` (14: bytes ids; 13: tuple ids) over
    NCCL ``version``. ``module.created`` lists the communicators made; ``module.groups`` the
    ``groupStart``/``groupEnd`` calls.

    Example::

        nccl = make_nccl(13)
        nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    """
    module = types.ModuleType("cupy.cuda.nccl")
    module.major = major  # type: ignore[attr-defined]
    module.available = True  # type: ignore[attr-defined]
    module.NcclError = NcclError  # type: ignore[attr-defined]
    module.created = []  # type: ignore[attr-defined]
    module.groups = []  # type: ignore[attr-defined]
    depth = [0]

    def get_version() -> int:
        return version

    def get_unique_id() -> bytes | tuple[int, ...]:
        raw = os.urandom(128)
        if major >= 14:
            return raw
        return tuple(b - 256 if _SIGNED_CHAR and b > 127 else b for b in raw)

    def group_start() -> None:
        depth[0] += 1
        module.groups.append("start")  # type: ignore[attr-defined]

    def group_end() -> None:
        if depth[0] == 0:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: invalid usage", 5)
        depth[0] -= 1
        module.groups.append("end")  # type: ignore[attr-defined]

    module.get_version = get_version  # type: ignore[attr-defined]
    module.get_unique_id = get_unique_id  # type: ignore[attr-defined]
    module.groupStart = group_start  # type: ignore[attr-defined]
    module.groupEnd = group_end  # type: ignore[attr-defined]
    module.NcclCommunicator = type(  # type: ignore[attr-defined]
        "NcclCommunicator", (FakeNcclCommunicator,), {"_module": module}
    )
    for name, code in (("NCCL_FLOAT32", 7), ("NCCL_SUM", 0), ("NCCL_UINT8", 1)):
        setattr(module, name, code)
    return module


def install(monkeypatch: pytest.MonkeyPatch, nccl: types.ModuleType) -> None:
    """Make ``import cupy`` / ``from cupy.cuda import nccl`` find the fake for this test."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl  # type: ignore[attr-defined]
    cupy.cuda = cuda  # type: ignore[attr-defined]
    cupy.__version__ = f"{getattr(nccl, 'major', 14)}.2.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)

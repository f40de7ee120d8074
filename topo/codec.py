"""Python values as bytes without pickle: what the object collectives and the MessageQueue
carry by default.

A value is encoded as a JSON tree (its structure and scalars) followed by the raw bytes of its
``bytes`` and tensors. Decoding builds only these types and checks every offset, length,
dtype and shape against what arrived, so bytes from a peer (or an intruder who redirected a
connection) can at worst make it raise :class:`~topo.errors.CollectiveMismatchError` —
never run code. What it carries:

- ``None``, ``bool``, ``int``, ``float`` (``nan`` and infinities too), ``complex``, ``str``;
- ``bytes`` and ``bytearray``;
- ``list``, ``tuple``, ``dict`` (keys of the hashable kinds here), ``set``, ``frozenset``;
- dense tensors of any dtype (CPU or CUDA; they arrive on the same device kind, detached),
  ``torch.dtype``, ``torch.device`` and ``torch.Size``.

Anything else (a class instance, a function, a NumPy array) is an error on the sender that
names the value's place and type. ``allow_pickle=True`` on both sides pickles instead — a
receiver then runs whatever code the bytes contain: use it only on a network you trust.

Example::

    data = encode({"step": 3, "w": torch.ones(2)}, "broadcast_object")
    decode(data, "broadcast_object")   # {'step': 3, 'w': tensor([1., 1.])}
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import struct
from typing import Any

import torch

from topo.errors import CollectiveMismatchError, TopoTypeError, TopoValueError

__all__ = ["MAX_DEPTH", "decode", "encode"]

#: The deepest nesting either side accepts (a deeper value is an error, not a RecursionError).
MAX_DEPTH = 100

_SAFE = b"tpo1"
_PICKLED = b"pkl1"
_LENGTH = struct.Struct("<Q")


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    """torch's dtypes by name (``"float32"``), built by the first decode that meets one (a walk
    over ``vars(torch)`` that every import would otherwise pay)."""
    return {
        str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
    }


def encode(value: Any, operation: str, allow_pickle: bool = False) -> bytes:
    """``value`` as bytes: topo's safe encoding, or a pickle where ``allow_pickle`` and the
    value has parts the safe encoding cannot carry.

    Example::

        encode([1, "a", b"\\x00", torch.zeros(2)], "send_object")
    """
    chunks: list[bytes] = []
    try:
        tree = _Encoder(operation, chunks).node(value, "", 0, set())
    except TopoTypeError:
        if not allow_pickle:
            raise
        try:
            return _PICKLED + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            raise TopoTypeError(
                f"topo.{operation} requires a value it can send, but pickling "
                f"{type(value).__name__} failed ({type(error).__name__}: {error})"
            ) from None
    header = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([_SAFE, _LENGTH.pack(len(header)), header, *chunks])


def decode(data: bytes, operation: str, allow_pickle: bool = False) -> Any:
    """The value :func:`encode` made; refuses a pickle unless ``allow_pickle``.

    Example::

        decode(encode({"a": 1}, "recv_object"), "recv_object")   # {'a': 1}
    """
    magic = bytes(data[:4])
    if magic == _PICKLED:
        if not allow_pickle:
            raise TopoValueError(
                f"topo.{operation} received a pickled object, but unpickling requires "
                f"allow_pickle=True on the receiving rank (a pickle can run any code: nothing "
                f"from the network is unpickled unless you opt in, and only on a network you "
                f"trust); send plain values, bytes and tensors instead"
            )
        return pickle.loads(data[4:])
    if magic != _SAFE or len(data) < 4 + _LENGTH.size:
        raise _garbage(operation, "it does not start with topo's marker")
    (length,) = _LENGTH.unpack_from(data, 4)
    start = 4 + _LENGTH.size
    if length > len(data) - start:
        raise _garbage(operation, f"its header claims {length} bytes")
    try:
        tree = json.loads(bytes(data[start : start + length]))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _garbage(operation, "its header is not JSON (or nests too deep)") from None
    return _Decoder(operation, memoryview(data)[start + length :]).node(tree, 0)


def _garbage(operation: str, why: str) -> CollectiveMismatchError:
    return CollectiveMismatchError(
        f"topo.{operation} received bytes that are not a topo-encoded value ({why}); the sending "
        f"rank must call the matching operation with the same topo version"
    )


_TAGS: dict[type, str] = {list: "l", tuple: "u", set: "s", frozenset: "z"}


class _Encoder:
    def __init__(self, operation: str, chunks: list[bytes]) -> None:
        self.operation = operation
        self.chunks = chunks
        self.offset = 0

    def _bytes(self, data: bytes) -> list[int]:
        at = self.offset
        self.chunks.append(data)
        self.offset += len(data)
        return [at, len(data)]

    def _refuse(self, value: object, path: str, why: str = "") -> TopoTypeError:
        where = f"obj{path}" if path else "obj"
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        return TopoTypeError(
            f"topo.{self.operation} requires plain values (None, bool, int, float, complex, str, "
            f"bytes, lists, tuples, dicts, sets, dense tensors, torch dtypes/devices/sizes), but "
            f"{where} is a {kind}{why}; convert it (e.g. to a dict of those), or pass "
            f"allow_pickle=True on every rank — only on a network you trust, since the receivers "
            f"then unpickle it"
        )

    def node(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        if depth > MAX_DEPTH:
            raise self._refuse(value, path, f" nested deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, (bool, str)):
            return {"v": value}
        if isinstance(value, int):
            return {"v": int(value)}
        if isinstance(value, float):
            if math.isfinite(value):
                return {"v": float(value)}
            return {"f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, complex):
            return {"c": [self.node(value.real, path, depth, seen), self.node(value.imag, path, depth, seen)]}  # fmt: skip
        if isinstance(value, (bytes, bytearray)):
            return {"b": [*self._bytes(bytes(value)), type(value) is bytearray]}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, torch.dtype):
            return {"dt": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"dv": str(value)}
        if isinstance(value, torch.Size):
            return {"sz": [int(s) for s in value]}
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            if id(value) in seen:
                raise self._refuse(value, path, " that contains itself")
            seen.add(id(value))
            try:
                return self._container(value, path, depth, seen)
            finally:
                seen.discard(id(value))
        raise self._refuse(value, path)

    def _container(self, value: Any, path: str, depth: int, seen: set[int]) -> Any:
        if type(value) not in (list, tuple, dict, set, frozenset):
            raise self._refuse(value, path, " (a subclass: its type would be lost)")
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                items.append([self.node(key, f"{path} key {key!r}", depth + 1, seen),
                              self.node(item, f"{path}[{key!r}]", depth + 1, seen)])  # fmt: skip
            return {"d": items}
        tag = _TAGS[type(value)]
        parts = sorted(value, key=repr) if tag in ("s", "z") else value
        return {tag: [self.node(v, f"{path}[{i}]", depth + 1, seen) for i, v in enumerate(parts)]}

    def _tensor(self, x: torch.Tensor, path: str) -> Any:
        if x.layout is not torch.strided or x.is_nested or x.is_quantized:
            raise self._refuse(x, path, f" that is not dense ({x.layout})")
        if x.device.type not in ("cpu", "cuda"):
            raise self._refuse(x, path, f" on {x.device} (only CPU and CUDA tensors travel)")
        # a lazy conj()/neg view is resolved first: its memory does not hold its values
        flat = x.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
        # through a trailing dim of 1: a one-element tensor counts as contiguous with any
        # stride, and view(uint8) requires the last stride to be 1
        raw = flat.unsqueeze(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        dtype = str(x.dtype).removeprefix("torch.")
        return {"t": [dtype, list(x.shape), str(x.device), *self._bytes(raw)]}


class _Decoder:
    def __init__(self, operation: str, payload: memoryview) -> None:
        self.operation = operation
        self.payload = payload

    def _bad(self, node: object) -> CollectiveMismatchError:
        return _garbage(self.operation, f"it has a node it cannot read: {str(node)[:80]!r}")

    def _slice(self, at: object, size: object, node: object) -> bytes:
        if not (type(at) is int and type(size) is int and at >= 0 and size >= 0):
            raise self._bad(node)
        if at + size > len(self.payload):
            raise self._bad(node)
        return bytes(self.payload[at : at + size])

    def node(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH + 1 or not isinstance(node, dict) or len(node) != 1:
            raise self._bad(node)
        ((tag, body),) = node.items()
        if tag == "v":
            if body is not None and not isinstance(body, (bool, int, float, str)):
                raise self._bad(node)
            return body
        if tag == "f":
            if body not in ("nan", "inf", "-inf"):
                raise self._bad(node)
            return float(body)
        if tag == "c" and isinstance(body, list) and len(body) == 2:
            re, im = (self.node(part, depth + 1) for part in body)
            if not all(isinstance(v, (int, float)) for v in (re, im)):
                raise self._bad(node)
            return complex(re, im)
        if tag == "b" and isinstance(body, list) and len(body) == 3:
            data = self._slice(body[0], body[1], node)
            return bytearray(data) if body[2] is True else data
        if tag == "t" and isinstance(body, list) and len(body) == 5:
            return self._tensor(body, node)
        if tag == "dt" and isinstance(body, str) and body in _dtypes():
            return _dtypes()[body]
        if tag == "dv" and isinstance(body, str):
            try:
                return torch.device(body)
            except (RuntimeError, ValueError):
                raise self._bad(node) from None
        if tag == "sz" and isinstance(body, list) and all(type(s) is int for s in body):
            return torch.Size(body)
        if tag in ("l", "u", "s", "z") and isinstance(body, list):
            items = [self.node(item, depth + 1) for item in body]
            if tag == "l":
                return items
            if tag == "u":
                return tuple(items)
            try:
                return set(items) if tag == "s" else frozenset(items)
            except TypeError:
                raise self._bad(node) from None
        if tag == "d" and isinstance(body, list):
            out = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise self._bad(node)
                key = self.node(pair[0], depth + 1)
                try:
                    out[key] = self.node(pair[1], depth + 1)
                except TypeError:  # an unhashable key
                    raise self._bad(node) from None
            return out
        raise self._bad(node)

    def _tensor(self, body: list[Any], node: object) -> torch.Tensor:
        name, shape, device, at, size = body
        dtype = _dtypes().get(name) if isinstance(name, str) else None
        if dtype is None:
            raise TopoTypeError(
                f"topo.{self.operation} received a tensor of dtype {name!r}, which this torch "
                f"({torch.__version__}) does not know; use the same torch version on both sides"
            )
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise self._bad(node)
        count = math.prod(shape)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if size != count * itemsize:
            raise self._bad(node)
        raw = self._slice(at, size, node)
        if count == 0:
            x = torch.empty(shape, dtype=dtype, device="cpu")  # as frombuffer's, below
        else:
            x = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        try:
            place = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise self._bad(node) from None
        if place.type == "cuda":
            if not torch.cuda.is_available():
                raise TopoValueError(
                    f"topo.{self.operation} received a tensor the sender had on {place}, which "
                    f"requires a CUDA GPU, but this rank has none; send it with .cpu() first"
                )
            x = x.to(place)
        elif place.type != "cpu":
            raise self._bad(node)
        return x

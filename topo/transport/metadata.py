"""Tensor-dict metadata: a nested dict/list/tuple of tensors and scalars as a JSON tree.

The tree keeps the structure, the scalars and every tensor's dtype, shape and device kind;
the tensors themselves are listed apart, in the order the tree numbers them. Nothing here is
executable on decode (no pickle), so a tensor dict can cross any trust boundary the
communicator itself is allowed to cross.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from topo.errors import CollectiveMismatchError, TopoTypeError, TopoValueError
from topo.transport._wire import dtype_from_name, dtype_name

__all__ = ["TensorSpec", "decode_tree", "encode_tree", "tree_specs"]

#: (dtype, shape, device kind) of one tensor of a tensor dict.
TensorSpec = tuple[torch.dtype, tuple[int, ...], str]

_SCALARS = (bool, int, float, str, type(None))


def _where(path: str) -> str:
    return f"d{path}" if path else "d"


def encode_tree(value: object, operation: str) -> tuple[Any, list[torch.Tensor]]:
    """``value`` (a dict) as a JSON-able tree and the list of its tensors, in tree order.

    Example::

        tree, tensors = encode_tree({"x": torch.ones(2), "step": 3}, "send_tensor_dict")
    """
    if not isinstance(value, Mapping):
        raise TopoTypeError(
            f"topo.{operation} d requires a dict (of tensors, scalars, lists and dicts), but got "
            f"{type(value).__name__}; wrap it, e.g. {{'x': value}}"
        )
    tensors: list[torch.Tensor] = []
    tree = _encode(value, "", tensors, operation, set())
    return tree, tensors


#: The deepest nesting a tensor dict may have (deeper is an error, not a RecursionError).
MAX_DEPTH = 100


def _encode(
    value: object, path: str, tensors: list[torch.Tensor], operation: str, seen: set[int]
) -> Any:
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in seen or len(seen) >= MAX_DEPTH:
            why = "contains itself" if id(value) in seen else f"nests deeper than {MAX_DEPTH}"
            raise TopoTypeError(
                f"topo.{operation} requires a tree of dicts, lists and tuples, but {_where(path)} "
                f"{why}; send a value without cycles"
            )
        seen.add(id(value))
        try:
            return _encode_container(value, path, tensors, operation, seen)
        finally:
            seen.discard(id(value))
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided or value.is_nested or value.is_quantized:
            raise TopoTypeError(
                f"topo.{operation} requires dense tensors, but {_where(path)} is "
                f"{'a nested' if value.is_nested else 'a quantized' if value.is_quantized else f'a {value.layout}'} "
                f"tensor; convert it (x.to_dense(), x.dequantize()) or send its parts"
            )
        kind = value.device.type
        if kind not in ("cpu", "cuda"):
            raise TopoValueError(
                f"topo.{operation} requires tensors on 'cpu' (gloo) or 'cuda' (NCCL), but "
                f"{_where(path)} is on {value.device}; move it with .cpu() or .cuda()"
            )
        tensors.append(value)
        # the itemsize lets a receiver whose torch lacks the dtype still drain the bytes
        return {"t": [dtype_name(value.dtype), list(value.shape), kind, value.element_size()]}
    if isinstance(value, _SCALARS):
        return {"v": value}
    raise TopoTypeError(
        f"topo.{operation} requires tensors or JSON-able scalars (int, float, str, bool, None) "
        f"in a tensor dict, but {_where(path)} is a {type(value).__module__}."
        f"{type(value).__qualname__}; make it a tensor (torch.tensor(...)) or one of those "
        f"scalars (metadata never travels pickled)"
    )


def _encode_container(
    value: Mapping[Any, Any] | list[Any] | tuple[Any, ...],
    path: str,
    tensors: list[torch.Tensor],
    operation: str,
    seen: set[int],
) -> Any:
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TopoTypeError(
                    f"topo.{operation} requires str keys (they travel as JSON), but "
                    f"{_where(path)} has the key {key!r} of type {type(key).__name__}; use "
                    f"str({key!r})"
                )
            items.append([key, _encode(item, f"{path}[{key!r}]", tensors, operation, seen)])
        return {"d": items}
    tag = "l" if isinstance(value, list) else "u"
    return {
        tag: [_encode(v, f"{path}[{i}]", tensors, operation, seen) for i, v in enumerate(value)]
    }


def tree_specs(tree: Any, operation: str) -> tuple[list[TensorSpec], TopoTypeError | None]:
    """The tensors' specs, in tree order, read back from a received tree, and the error for
    a dtype this torch does not know (that tensor's spec then uses a known dtype of the same
    itemsize, so the receiver can still take the bytes off the wire before raising it).

    Example::

        specs, error = tree_specs({"d": [["x", {"t": ["float32", [2], "cpu", 4]}]]}, "recv")
    """
    specs: list[TensorSpec] = []
    errors: list[TopoTypeError] = []
    _specs(tree, specs, errors, operation)
    return specs, (errors[0] if errors else None)


#: A stand-in dtype per itemsize, for tensors of a dtype this torch does not know.
_STAND_INS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _bad(operation: str, node: object) -> CollectiveMismatchError:
    return CollectiveMismatchError(
        f"topo.{operation} received metadata it cannot read (at {str(node)[:80]!r}); the "
        f"sending rank must call the matching operation with the same topo version"
    )


def _specs(node: Any, out: list[TensorSpec], errors: list[TopoTypeError], operation: str) -> None:
    if not isinstance(node, dict) or len(node) != 1:
        raise _bad(operation, node)
    ((tag, body),) = node.items()
    if tag == "t":
        if not (isinstance(body, list) and len(body) == 4 and isinstance(body[1], list)):
            raise _bad(operation, node)
        try:
            dtype = dtype_from_name(body[0], f"topo.{operation}")
        except TopoTypeError as error:
            if body[3] not in _STAND_INS:
                raise
            errors.append(error)
            dtype = _STAND_INS[body[3]]
        shape = tuple(int(s) for s in body[1])
        if body[2] not in ("cpu", "cuda") or any(s < 0 for s in shape):
            raise _bad(operation, node)
        out.append((dtype, shape, body[2]))
    elif tag == "d":
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise _bad(operation, node)
            _specs(pair[1], out, errors, operation)
    elif tag in ("l", "u"):
        for item in body:
            _specs(item, out, errors, operation)
    elif tag != "v":
        raise _bad(operation, node)


def decode_tree(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the value from a tree and its tensors (checked by :func:`tree_specs` first).

    Example::

        decode_tree({"d": [["step", {"v": 3}]]}, [])   # {'step': 3}
    """
    it = iter(tensors)
    return _decode(tree, it)


def _decode(node: dict[str, Any], tensors: Any) -> Any:
    ((tag, body),) = node.items()
    if tag == "t":
        return next(tensors)
    if tag == "d":
        return {key: _decode(item, tensors) for key, item in body}
    if tag == "l":
        return [_decode(item, tensors) for item in body]
    if tag == "u":
        return tuple(_decode(item, tensors) for item in body)
    return body

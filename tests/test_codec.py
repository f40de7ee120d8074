"""topo.codec: values without pickle — round trips, and bytes from an attacker that can only
raise a TopoError, never run code or escape as another exception."""

from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import topo
from topo.codec import MAX_DEPTH, decode, encode

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
)
keys = st.one_of(
    st.text(max_size=8), st.integers(-5, 5), st.tuples(st.integers(0, 3), st.text(max_size=3))
)
tensors = st.builds(
    lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 9).to(dtype),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]),
    st.integers(0, 100),
)  # fmt: skip
values = st.recursive(
    st.one_of(scalars, tensors, st.sampled_from([torch.float16, torch.Size([2, 3]), torch.device("cpu")])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
        st.frozensets(st.integers(0, 9), max_size=4),
        st.sets(st.text(max_size=3), max_size=4),
    ),
    max_leaves=20,
)  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a, b)
        )  # fmt: skip
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None)
@given(value=values)
def test_every_value_comes_back_equal_and_of_its_type(value: Any) -> None:
    assert _same(decode(encode(value, "t"), "t"), value)


def test_special_floats_bytes_kinds_and_views() -> None:
    value = [float("nan"), float("inf"), -math.inf, bytearray(b"ab"), b"", torch.arange(6.0)[::2]]
    back = decode(encode(value, "t"), "t")
    assert math.isnan(back[0]) and back[1:3] == [math.inf, -math.inf]
    assert type(back[3]) is bytearray and back[4] == b""
    assert torch.equal(back[5], torch.tensor([0.0, 2.0, 4.0]))
    grad = torch.ones(2, requires_grad=True)
    assert not decode(encode(grad, "t"), "t").requires_grad  # detached


def test_lazy_views_and_a_strided_element_travel_as_their_values() -> None:
    # a conj() view's memory holds the unconjugated values, the .imag of one its values
    # negated; a one-element tensor counts as contiguous with any stride
    z = torch.tensor([1 + 2j, 3 - 4j])
    value = [z.conj(), z[:1].conj().imag, torch.arange(6.0)[::2][:1]]
    back = decode(encode(value, "t"), "t")
    assert back[0].tolist() == [1 - 2j, 3 + 4j] and not back[0].is_conj()
    assert back[1].tolist() == [-2.0] and back[2].tolist() == [0.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda: 0, r"obj is a builtins\.function"),
        ({"a": [1, object()]}, r"obj\['a'\]\[1\] is a builtins\.object"),
        (torch.eye(2).to_sparse(), "not dense"),
        (type("L", (list,), {})(), "subclass"),
    ],
)
def test_what_it_cannot_carry_is_named_on_the_sender(value: Any, message: str) -> None:
    with pytest.raises(topo.TopoTypeError, match=message) as caught:
        encode(value, "broadcast_object")
    assert "allow_pickle=True" in str(caught.value)


def test_cycles_and_depth_are_errors_not_recursion() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(topo.TopoTypeError, match="contains itself"):
        encode(cycle, "t")
    deep: list[Any] = []
    node = deep
    for _ in range(MAX_DEPTH + 5):
        node.append([])
        node = node[0]
    with pytest.raises(topo.TopoTypeError, match=f"deeper than {MAX_DEPTH}"):
        encode(deep, "t")


class _Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("pwned",))


def test_a_pickle_is_refused_unless_the_receiver_opts_in(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    payload = b"pkl1" + pickle.dumps(_Canary(str(canary)))
    with pytest.raises(topo.TopoValueError, match="requires allow_pickle=True"):
        decode(payload, "recv_object")
    assert not canary.exists()
    with pytest.raises(topo.TopoError):
        decode(pickle.dumps(_Canary(str(canary))), "recv_object")  # a bare pickle: garbage
    assert not canary.exists()
    decode(payload, "recv_object", allow_pickle=True)  # the caller opted in: it runs
    assert canary.read_text() == "pwned"


def test_allow_pickle_carries_what_the_safe_encoding_cannot() -> None:
    import fractions

    value = {"f": fractions.Fraction(1, 3)}
    assert decode(encode(value, "t", allow_pickle=True), "t", allow_pickle=True) == value
    assert encode({"a": 1}, "t", allow_pickle=True)[:4] == b"tpo1"  # safe when it can be


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_topo_errors(data: bytes) -> None:
    for candidate in (data, b"tpo1" + data):
        with contextlib.suppress(topo.TopoError):
            decode(candidate, "t")


@settings(max_examples=300, deadline=None)
@given(value=values, position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_a_tampered_encoding_only_raises_topo_errors(value: Any, position: int, byte: int) -> None:
    data = bytearray(encode(value, "t"))
    data[position % len(data)] = byte
    with contextlib.suppress(topo.TopoError):
        decode(bytes(data), "t")


@pytest.mark.parametrize(
    "header",
    [
        b'{"t":["float32",[1000000000000],"cpu",0,4]}',  # a huge claimed shape
        b'{"t":["float32",[2],"cpu",-4,8]}',  # a negative offset
        b'{"t":["nope",[1],"cpu",0,4]}',  # an unknown dtype
        b'{"t":["float32",[1],"cuda:99",0,4]}' if not torch.cuda.is_available() else b"[]",
        b'{"d":[[{"l":[]},{"v":1}]]}',  # an unhashable key
        b'{"v":{"x":1}}',  # a scalar that is not one
        b"[" * 5000,  # nested beyond any limit
    ],
)
def test_hostile_headers_are_refused(header: bytes) -> None:
    import struct

    data = b"tpo1" + struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(topo.TopoError):
        decode(data, "t")

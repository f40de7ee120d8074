"""What each rank of a 2-rank ``tp`` axis gets from collectives on lazy views (``topo.spawn``
runs :func:`lazy_views` on every rank; module level, so picklable).

A ``conj()`` view's memory holds the unconjugated values, and the ``.imag`` of one holds its
values negated (a "negative bit"). A backend that moved such a tensor's memory, or wrote a
result into it, would send or leave the wrong values. The ranks only run collectives and
report what they read back; the test computes every expected value from :func:`complex_input`
and :func:`negative_input`.
"""

from __future__ import annotations

from typing import Any

import torch

import topo


def complex_input(rank: int) -> torch.Tensor:
    """Rank ``rank``'s plain complex tensor (4 elements, distinct on every rank)."""
    return ((torch.arange(4, dtype=torch.float32) + 10 * rank) * (1 + 2j)).to(torch.complex64)


def negative_input(rank: int) -> torch.Tensor:
    """A 1-element contiguous tensor with the negative bit: it reads ``-(3 + rank)``, its memory
    holds ``3 + rank``."""
    view = torch.tensor([1 + (3.0 + rank) * 1j], dtype=torch.complex64).conj().imag
    assert view.is_neg() and view.is_contiguous()
    return view


def _conj_view(z: torch.Tensor) -> torch.Tensor:
    """A view that reads ``z.conj()`` with the conjugate bit set (its memory holds ``z``)."""
    view = z.clone().conj()
    assert view.is_conj() and view.is_contiguous()
    return view


def _empty_conj(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.complex64).conj()


def _empty_negative() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.complex64).conj().imag


def lazy_views() -> dict[str, Any]:
    """Every collective with a lazy view as its input, or as its ``out=``; each result read
    back through the view (``resolve_conj``/``resolve_neg``) as a list."""
    me = topo.axis_index("tp")
    z = complex_input(me)
    got: dict[str, torch.Tensor | None] = {}
    got["all_gather"] = topo.all_gather(_conj_view(z), "tp")
    got["all_gather dim 1"] = topo.all_gather(_conj_view(z).reshape(2, 2), "tp", dim=1)
    out = _empty_conj(8)
    got["all_gather out="] = topo.all_gather(z, "tp", out=out)
    got["broadcast"] = topo.broadcast(_conj_view(z), "tp", src=1)
    got["broadcast out="] = topo.broadcast(z, "tp", src=0, out=_empty_conj(4))
    in_place = _conj_view(z)
    got["broadcast in place"] = topo.broadcast(in_place, "tp", src=1, out=in_place)
    got["all_to_all"] = topo.all_to_all(_conj_view(z), "tp")
    got["all_gatherv"] = topo.all_gatherv(_conj_view(z)[: me + 1], "tp")
    got["ppermute"] = topo.ppermute(_conj_view(z), "tp", [(0, 1), (1, 0)])
    got["shift"] = topo.shift(_conj_view(z), "tp", offset=1)
    got["scatter"] = topo.scatter(_conj_view(z), "tp", src=1)
    got["gather"] = topo.gather(_conj_view(z), "tp", dst=0)
    if me == 0:
        topo.send(_conj_view(z), "tp", dst=1)
    else:
        got["send/recv"] = topo.recv((4,), torch.complex64, "tp", src=0)
    got["all_reduce sum"] = topo.all_reduce(negative_input(me), "tp")
    got["all_reduce max"] = topo.all_reduce(negative_input(me), "tp", op="max")
    negative = negative_input(me)
    got["all_reduce prod in place"] = topo.all_reduce(negative, "tp", op="prod", out=negative)
    got["all_reduce out="] = topo.all_reduce(torch.tensor([1.0 + me]), "tp", out=_empty_negative())
    pair = torch.tensor([1.0 + me, 2.0 + me])
    got["reduce_scatter out="] = topo.reduce_scatter(pair, "tp", out=_empty_negative())
    # 2 elements with the negative bit: only torch._neg_view makes a contiguous one
    got["reduce_scatter"] = topo.reduce_scatter(torch._neg_view(pair), "tp")
    # the byte paths: a dict of tensors and the object codec
    sent = {"c": _conj_view(z), "n": negative_input(me), "strided": torch.arange(6.0)[::2][:1]}
    tree = topo.broadcast_tensor_dict(sent if me == 1 else None, "tp", src=1)
    got.update({f"tensor_dict {k}": v for k, v in tree.items()})
    got["broadcast_object"] = topo.broadcast_object({"c": _conj_view(z)}, "tp", src=0)["c"]
    w = z.clone().requires_grad_()
    gathered = topo.all_gather(w.conj(), "tp")
    (gathered * gathered.conj()).real.sum().backward()  # sum of |.|^2, exact in float32
    got["gradient"] = w.grad
    return {
        name: None if t is None else t.resolve_conj().resolve_neg().tolist()
        for name, t in got.items()
    }

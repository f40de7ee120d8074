"""Expert parallelism: a top-2 mixture-of-experts layer with its experts sharded over an axis.

E = 8 experts (each a small MLP) live on the expert-parallel axis ``ep = ("dp", "tp")`` of a
2×2 mesh (``mesh.with_axes(ep=("dp", "tp"))``): 4 ranks, 2 experts each (rank ``i`` holds
experts ``2i`` and ``2i + 1``). Every rank routes its own tokens (a linear router, softmax,
the top 2 experts, their gates renormalized) and the tokens meet their experts in one of two ways:

- ``"a2a"``: each token is sent to the ranks that own its two experts with
  ``topo.all_to_allv`` (dispatch), the experts run on what arrived, and a second
  ``topo.all_to_allv`` with the sizes swapped brings the results home (combine), where the
  gates weigh them;
- ``"allgather"``: vLLM's default dispatch ("allgather/reducescatter"): every rank gathers
  every rank's tokens with ``topo.all_gatherv``, runs its own experts on the tokens routed to
  them, and ``topo.reduce_scatterv`` sums the experts' outputs and hands each rank its
  tokens' rows.

Both give the single-process layer's outputs and gradients (with respect to the tokens, the
router and every expert's weights); :func:`run_rank` returns what a rank got and
:func:`max_errors` compares it with :func:`reference`. Ranks hold different numbers of tokens.

Run::

    python examples/moe_ep.py        # topo.spawn starts the 4 ranks; prints the max errors
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import topo

#: dp × tp with the derived axis ``ep`` spanning both (every rank of the mesh): ``axis="ep"``
#: names the group of ``("dp", "tp")``, and shares its communicator.
MESH = topo.DeviceMesh(dp=2, tp=2).with_axes(ep=("dp", "tp"))
EP = "ep"  # the expert-parallel axis
EXPERTS, TOP_K, DIM, HIDDEN = 8, 2, 16, 32
VARIANTS = ("a2a", "allgather")


def params() -> dict[str, torch.Tensor]:
    """The whole layer (every rank builds the same): router and the experts' weights."""
    g = torch.Generator().manual_seed(0)
    return {
        "router": torch.randn(DIM, EXPERTS, generator=g) * DIM**-0.5,
        "w1": torch.randn(EXPERTS, DIM, HIDDEN, generator=g) * DIM**-0.5,
        "w2": torch.randn(EXPERTS, HIDDEN, DIM, generator=g) * HIDDEN**-0.5,
    }


def tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens and targets: 6 + 3·rank of them (the ranks differ)."""
    g = torch.Generator().manual_seed(100 + rank)
    count = tokens_count(rank)
    return torch.randn(count, DIM, generator=g), torch.randn(count, DIM, generator=g)


def loss(out: torch.Tensor, target: torch.Tensor, ranks: int) -> torch.Tensor:
    """This rank's share of the squared error per token over the whole batch of every rank."""
    every_token = sum(tokens_count(rank) for rank in range(ranks))
    return ((out - target) ** 2).sum() / every_token


def tokens_count(rank: int) -> int:
    return 6 + 3 * rank


def route(x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts ``(tokens, k)`` and their gates (softmax, renormalized)."""
    probs = torch.softmax(x @ router, dim=-1)
    top, experts = probs.topk(TOP_K, dim=-1)
    return top / top.sum(-1, keepdim=True), experts


def expert(h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.gelu(h @ w1) @ w2


def moe_reference(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer in one process, every expert here."""
    gates, experts = route(x, p["router"])
    out = torch.zeros_like(x)
    for e in range(EXPERTS):
        token, slot = (experts == e).nonzero(as_tuple=True)
        y = expert(x[token], p["w1"][e], p["w2"][e])
        out = out.index_add(0, token, gates[token, slot, None] * y)
    return out


def _local_experts(
    h: torch.Tensor, which: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Row ``r`` of ``h`` through local expert ``which[r]`` (rows of other experts: zeros)."""
    out = torch.zeros_like(h)
    for e in range(w1.shape[0]):
        rows = (which == e).nonzero(as_tuple=True)[0]
        out = out.index_add(0, rows, expert(h[rows], w1[e], w2[e]))
    return out


def moe_a2a(
    x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Dispatch with ``all_to_allv``, the local experts, combine with ``all_to_allv``."""
    n, me, local = topo.axis_size(EP), topo.axis_index(EP), w1.shape[0]
    gates, experts = route(x, router)
    flat = experts.reshape(-1)  # (tokens · k,): token t's choices at t·k, t·k + 1
    order = torch.argsort(flat, stable=True)  # grouped by expert, so by owning rank
    token = order // TOP_K
    send = torch.bincount(flat[order] // local, minlength=n)
    recv = topo.all_to_all(send, EP)  # how many rows every rank sends here
    send_sizes, recv_sizes = send.tolist(), recv.tolist()
    rows = topo.all_to_allv(x[token], EP, send_sizes, recv_sizes)  # dispatch
    which = topo.all_to_allv(flat[order], EP, send_sizes, recv_sizes) - me * local
    done = topo.all_to_allv(_local_experts(rows, which, w1, w2), EP, recv_sizes, send_sizes)
    weighted = done * gates.reshape(-1)[order, None]  # combine: back home, weighed
    return torch.zeros_like(x).index_add(0, token, weighted)


def moe_allgather(
    x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Gather every token with ``all_gatherv``, the local experts, ``reduce_scatterv``."""
    me, local = topo.axis_index(EP), w1.shape[0]
    gates, experts = route(x, router)
    count = torch.tensor([x.shape[0]], device=x.device)
    sizes = topo.all_gather(count, EP).tolist()  # every rank's number of tokens
    every_x = topo.all_gatherv(x, EP, sizes=sizes)
    every_gate = topo.all_gatherv(gates, EP, sizes=sizes)
    every_expert = topo.all_gatherv(experts, EP, sizes=sizes) - me * local
    out = torch.zeros_like(every_x)
    for e in range(local):
        token, slot = (every_expert == e).nonzero(as_tuple=True)
        y = expert(every_x[token], w1[e], w2[e])
        out = out.index_add(0, token, every_gate[token, slot, None] * y)
    return topo.reduce_scatterv(out, EP, sizes)  # every expert's share, summed; my rows


def run_rank(variant: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One forward and backward of the layer on this rank of the active mesh, on ``device``
    tensors (``"cuda"``: NCCL): the output and the gradients of the sum of every rank's loss
    (the router's summed over ranks, as data parallelism would; the experts' for this rank's
    experts only), as CPU tensors."""
    p = {k: v.to(device) for k, v in params().items()}
    n, me = topo.axis_size(EP), topo.axis_index(EP)
    local = EXPERTS // n
    mine = slice(me * local, (me + 1) * local)
    x, target = (t.to(device) for t in tokens(topo.current().rank))
    x.requires_grad_(True)
    router = p["router"].clone().requires_grad_(True)
    w1 = p["w1"][mine].clone().requires_grad_(True)
    w2 = p["w2"][mine].clone().requires_grad_(True)
    layer = moe_a2a if variant == "a2a" else moe_allgather
    out = layer(x, router, w1, w2)
    loss(out, target, n).backward()
    assert x.grad is not None and router.grad is not None
    assert w1.grad is not None and w2.grad is not None
    got = {
        "out": out.detach(),
        "x": x.grad,
        "router": topo.all_reduce(router.grad, EP),
        "w1": w1.grad,
        "w2": w2.grad,
    }
    return {k: v.cpu() for k, v in got.items()}


def run_both(device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """:func:`run_rank` for both variants."""
    return {variant: run_rank(variant, device) for variant in VARIANTS}


def reference(ranks: int = MESH.size) -> list[dict[str, torch.Tensor]]:
    """What each rank should get, from the whole layer in one process over every rank's
    tokens (the loss: the sum of every rank's loss)."""
    p = {k: v.clone().requires_grad_(True) for k, v in params().items()}
    xs, outs, total = [], [], torch.zeros(())
    for rank in range(ranks):
        x, target = tokens(rank)
        x.requires_grad_(True)
        out = moe_reference(x, p)
        total = total + loss(out, target, ranks)
        xs.append(x)
        outs.append(out.detach())
    total.backward()
    local = EXPERTS // ranks
    return [
        {
            "out": outs[r],
            "x": xs[r].grad,
            "router": p["router"].grad,
            "w1": p["w1"].grad[r * local : (r + 1) * local],  # type: ignore[index]
            "w2": p["w2"].grad[r * local : (r + 1) * local],  # type: ignore[index]
        }
        for r in range(ranks)
    ]  # type: ignore[misc]


def max_errors(results: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, float]:
    """Each variant's largest absolute difference from :func:`reference`, over every rank,
    the outputs and every gradient."""
    want = reference(len(results))
    return {
        variant: max(
            (got[variant][k] - ref[k]).abs().max().item()
            for got, ref in zip(results, want, strict=True)
            for k in ref
        )
        for variant in VARIANTS
    }


def main() -> None:
    errors = max_errors(topo.spawn(run_both, MESH, timeout=180))
    for variant, error in errors.items():
        print(f"{variant:>9}: max |error| vs the single-process layer {error:.2e}")
    if max(errors.values()) > 1e-5:
        sys.exit(f"expert parallelism differs from the single-process layer: {errors}")


if __name__ == "__main__":
    main()

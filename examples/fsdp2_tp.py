"""FSDP2 over ``dp`` and DTensor tensor parallelism over ``tp`` on a topo mesh (2×2).

A tiny transformer block (attention + MLP) is split with torch's tensor-parallel plan over the
``tp`` axis and sharded with ``fully_shard`` over the ``dp`` axis of one topo mesh; one SGD step
must give the loss and parameters of the same block trained in a single process on the whole
batch.

It runs on CUDA (NCCL) when every local rank has a GPU of its own, else on CPU (gloo): NCCL
refuses two ranks of one communicator on one GPU, so on a machine with fewer GPUs than ranks
(one GPU and 4 ranks, say) the example picks gloo. ``TOPO_EXAMPLE_DEVICE=cpu`` or ``=cuda``
forces the choice.

Run it either way::

    python examples/fsdp2_tp.py                              # topo.spawn starts 4 local ranks
    torchrun --nproc-per-node=4 examples/fsdp2_tp.py         # torchrun starts them

Both print the largest difference from the single-process reference.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import topo

MESH = topo.DeviceMesh(dp=2, tp=2)
DIM, HEADS, SEQ, BATCH, LR = 16, 4, 4, 4, 0.1


class Block(nn.Module):
    """Pre-norm attention and MLP; head count follows the local width, so it runs unchanged
    when ``tp`` splits the heads."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, -1, DIM // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def build() -> Block:
    torch.manual_seed(0)
    return Block()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (every dp rank takes its rows)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, SEQ, DIM, generator=g), torch.randn(BATCH, SEQ, DIM, generator=g)


def reference() -> dict[str, Any]:
    """One SGD step of the whole block on the whole batch in this process."""
    model = build()
    x, y = batch()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return {"loss": loss.item(), "params": {n: p.detach() for n, p in model.named_parameters()}}


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
    return fully_shard


def device_type(ctx: topo.MeshContext) -> str:
    """``"cuda"`` when each local rank has a GPU of its own, else ``"cpu"`` (gloo); the
    environment variable ``TOPO_EXAMPLE_DEVICE`` overrides."""
    forced = os.environ.get("TOPO_EXAMPLE_DEVICE")
    if forced in ("cpu", "cuda"):
        return forced
    if torch.cuda.is_available() and torch.cuda.device_count() >= ctx.world.local_world_size:
        return "cuda"
    return "cpu"


def train_step() -> dict[str, Any]:
    """One step on this rank of the active topo mesh: TP over ``tp``, FSDP2 over ``dp``."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # full_tensor() of a 2-D sharded parameter warns that it gathers twice: expected here.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    ctx = topo.current()
    kind = device_type(ctx)
    device = ctx.device if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
    mesh = ctx.torch_mesh(device_type=kind)  # a torch DeviceMesh with names ("dp", "tp")
    model = build().to(device)
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
            "out": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()}
    parallelize_module(model, mesh["tp"], plan)
    _fully_shard()(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    x, y = (t.to(device) for t in batch())
    rows = BATCH // ctx.axis_size("dp")
    dp = ctx.axis_index("dp")
    loss = F.mse_loss(model(x[dp * rows : (dp + 1) * rows]), y[dp * rows : (dp + 1) * rows])
    loss.backward()  # FSDP2 averages the gradients over dp; TP's collectives run over tp
    optimizer.step()
    mean_loss = topo.all_reduce(loss.detach(), axis="dp", op="avg")
    params = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
    return {"loss": mean_loss.item(), "params": params}


def max_difference(result: dict[str, Any], ref: dict[str, Any]) -> float:
    """Largest absolute difference of loss and parameters from the reference."""
    diffs = [abs(result["loss"] - ref["loss"])]
    diffs += [(result["params"][n] - p).abs().max().item() for n, p in ref["params"].items()]
    return max(diffs)


def main() -> None:
    ref = reference()
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:  # under torchrun
        with MESH.activate() as ctx:
            diff = max_difference(train_step(), ref)
            if ctx.rank == 0:
                print(f"torchrun: loss {ref['loss']:.6f}, max |diff| vs reference {diff:.2e}")
    else:
        results = topo.spawn(train_step, MESH, timeout=180)
        diff = max(max_difference(r, ref) for r in results)
        print(f"topo.spawn: loss {ref['loss']:.6f}, max |diff| vs reference {diff:.2e}")
    if diff > 1e-5:
        sys.exit(f"FSDP2 + TP differ from the single-process reference by {diff:.2e}")


if __name__ == "__main__":
    main()

"""RLHF weight sync on Ray: a trainer mesh (dp=2) and an inference mesh (tp=2), each a set of
``topo.ray.MeshActors``, joined by a ``topo.transfer.bridge``.

After every training step the trainer's rank 0 sends its weights to every inference rank over
the bridge (packed, double-buffered, the handshake checked on both sides); each inference rank
loads them and answers with a checksum, which must equal the trainer's bit for bit. The loop
runs twice: packed, then one broadcast per tensor (``packed=False``), for the ratio.

    python examples/rlhf_ray.py            # a local Ray cluster of 4 CPUs
    python examples/rlhf_ray.py --steps 5

The actors keep their activations (their mesh and the bridge) open across calls: only the
first call of each meets the others at a store. What a rank keeps between calls (its model,
its optimizer, the open bridge) lives in ``topo.ray.rank_state()``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import secrets
import time
from datetime import timedelta
from typing import Any

import ray
import torch

import topo
import topo.ray
import topo.transfer
from topo.store import host_store, listen_socket

TRAINER = topo.DeviceMesh(dp=2)
INFERENCE = topo.DeviceMesh(tp=2)
BRIDGE_SIZE = 1 + INFERENCE.size  # the trainer's rank 0 and every inference rank
LAYERS, WIDTH = 48, 32  # 96 small tensors (weights and biases): where packing pays
BUCKET_BYTES = 16 << 20  # CPU transfers pipeline better with small buckets
WAIT = 120.0  # seconds any one call may take


def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = [
        torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()) for _ in range(LAYERS)
    ]
    return torch.nn.Sequential(*layers)


def checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every weight's bytes, in order: equal only when bit for bit equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------- on the trainer's ranks


def reserve_bridge_port() -> tuple[str, int] | None:
    """Trainer rank 0: host the bridge's store at this node's IP on a port the kernel picks,
    held until the bridge opens it (no other program can take it meanwhile)."""
    if topo.current().rank != 0:
        return None
    address = ray.util.get_node_ip_address()
    store = host_store(address, listen_socket(address, 0), timedelta(seconds=WAIT))
    topo.ray.rank_state()["bridge_store"] = store
    return address, store.port


def open_trainer(address: str, port: int, secret: str) -> str:
    state = topo.ray.rank_state()
    model = make_model(seed=0)  # the same start on both dp ranks
    state["model"] = model
    state["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.05)
    if topo.current().rank == 0:
        bridge = contextlib.ExitStack()
        bridge.enter_context(
            topo.transfer.bridge(address, port, 0, BRIDGE_SIZE, secret=secret, timeout=WAIT)
        )
        state["bridge"] = bridge  # open until close_bridge: every step reuses it
        del state["bridge_store"]  # the bridge holds the store now
    return checksum(model)


def train_step(step: int, packed: bool) -> dict[str, Any]:
    ctx = topo.current()
    state = topo.ray.rank_state()
    model, optimizer = state["model"], state["optimizer"]
    torch.manual_seed(1000 * step + ctx.rank)  # each dp rank its own batch
    loss = model(torch.randn(16, WIDTH)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    flat = topo.all_reduce(torch.cat([p.grad.reshape(-1) for p in params]), axis="dp", op="avg")
    at = 0
    for p in params:
        assert p.grad is not None
        p.grad.copy_(flat[at : at + p.numel()].view_as(p))
        at += p.numel()
    optimizer.step()
    out: dict[str, Any] = {"loss": loss.item(), "checksum": checksum(model)}
    if ctx.rank == 0:
        sent = topo.transfer.send_weights(
            model.state_dict().items(), axis="bridge", packed=packed, bucket_bytes=BUCKET_BYTES
        )
        out.update(tensors=sent.tensors, nbytes=sent.nbytes, calls=sent.calls, seconds=sent.seconds)
    return out


# ----------------------------------------------------------------- on the inference ranks


def open_inference(address: str, port: int, secret: str) -> str:
    state = topo.ray.rank_state()
    ctx = topo.current()
    model = make_model(seed=100 + ctx.rank)  # not the trainer's weights until it sends them
    state["model"] = model
    rank = topo.transfer.worker_rank(0, ctx.axis_index("tp"), world_size_per_dp=INFERENCE.size)
    bridge = contextlib.ExitStack()
    bridge.enter_context(
        topo.transfer.bridge(address, port, rank, BRIDGE_SIZE, secret=secret, timeout=WAIT)
    )
    state["bridge"] = bridge
    return checksum(model)


def load_weights(packed: bool) -> str:
    model = topo.ray.rank_state()["model"]
    weights = model.state_dict()

    def load(name: str, tensor: torch.Tensor) -> None:
        weights[name].copy_(tensor)  # copy: tensor is a view into a reused buffer

    with torch.no_grad():
        topo.transfer.receive_weights("bridge", load=load, expect=weights, packed=packed)
    return checksum(model)


def close_bridge() -> None:
    bridge = topo.ray.rank_state().pop("bridge", None)
    if bridge is not None:
        bridge.close()


# ----------------------------------------------------------------- the driver


def rlhf(
    trainer: topo.ray.MeshActors,
    inference: topo.ray.MeshActors,
    steps: range,
    packed: bool,
    verbose: bool,
) -> dict[str, Any]:
    """Train ``steps`` steps; after each, send the weights and check the inference side."""
    total = {"steps": 0, "nbytes": 0, "calls": 0, "seconds": 0.0, "equal": True}
    for step in steps:
        sending = trainer.submit(train_step, step, packed)
        loading = inference.submit(load_weights, packed)
        trained, loaded = sending.result(WAIT), loading.result(WAIT)
        sent = trained[0]
        equal = trained[1]["checksum"] == sent["checksum"] and all(
            c == sent["checksum"] for c in loaded
        )
        total["equal"] = total["equal"] and equal
        total["steps"] += 1
        for key in ("nbytes", "calls", "seconds"):
            total[key] += sent[key]
        if verbose:
            print(
                f"step {step}  loss {sent['loss']:.5f}  sent {sent['tensors']} tensors, "
                f"{sent['nbytes']:,} bytes in {sent['calls']} broadcast(s), "
                f"{sent['seconds'] * 1e3:.2f} ms  inference == trainer: {equal}"
            )
    return total


def main(steps: int = 3, verbose: bool = True) -> dict[str, Any]:
    """Run the loop packed and per-tensor; return both totals and the ratio."""
    started = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with (
            topo.ray.MeshActors(TRAINER, activation_timeout=WAIT) as trainer,
            topo.ray.MeshActors(INFERENCE, activation_timeout=WAIT) as inference,
        ):
            reserved = trainer.run(reserve_bridge_port, timeout=WAIT)[0]
            assert reserved is not None
            address, port = reserved
            secret = secrets.token_hex(16)  # authenticates every value in the bridge's store
            opening = trainer.submit(open_trainer, address, port, secret)
            before = inference.submit(open_inference, address, port, secret).result(WAIT)
            start = opening.result(WAIT)[0]
            assert all(c != start for c in before), "inference must start from other weights"
            if verbose:
                print(
                    f"trainer {TRAINER}, inference {INFERENCE}, bridge of {BRIDGE_SIZE} ranks: "
                    f"ready after {time.perf_counter() - started:.1f} s"
                )
                print("packed (one bucket per step):")
            packed = rlhf(trainer, inference, range(steps), True, verbose)
            if verbose:
                print("per tensor (packed=False):")
            per_tensor = rlhf(trainer, inference, range(steps, 2 * steps), False, verbose)
            closing = trainer.submit(close_bridge)
            inference.run(close_bridge, timeout=WAIT)
            closing.result(WAIT)
            closed = time.perf_counter()
    finally:
        if own:
            ray.shutdown()
    ratio = per_tensor["seconds"] / packed["seconds"]
    equal = packed["equal"] and per_tensor["equal"]
    if verbose:
        for label, total in (("packed", packed), ("per tensor", per_tensor)):
            print(
                f"{label:>10}: {total['steps']} steps, {total['nbytes']:,} bytes moved in "
                f"{total['calls']} broadcasts, {total['seconds'] * 1e3:.1f} ms"
            )
        print(f"per-tensor / packed time: {ratio:.1f}x; weights equal bit for bit: {equal}")
        print(
            f"wall time {time.perf_counter() - started:.1f} s (Ray's shutdown: "
            f"{time.perf_counter() - closed:.1f} s)"
        )
    return {"packed": packed, "per_tensor": per_tensor, "ratio": ratio, "equal": equal}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    main(parser.parse_args().steps)

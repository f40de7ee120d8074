"""Transport figures for issue 10, printed (not asserted):

1. a 1 KiB control message from one writer to 3 local readers: ``topo.MessageQueue`` (shared
   memory, and its socket path) vs ``topo.broadcast_object`` over gloo, in the same 4
   processes (goal <= 0.2x): one-way latency of paced messages, and back-to-back throughput;
2. ``topo.broadcast_tensor_dict`` of 64 small tensors vs 64 ``topo.broadcast`` calls;
3. ``topo.all_gatherv`` (uneven sizes) vs ``topo.all_gather`` of the padded tensors.

Run: ``python benchmarks/transport.py`` (well under a minute on 2 cores). Each figure is the
median over repeats of the time per message / call; the alternatives run interleaved in the
same processes so that machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import topo

REPEATS = 7
MESSAGES = 200
LATENCY_MESSAGES = 60


def _barrier(axis: Any) -> None:
    topo.barrier(axis)


def queue_vs_broadcast_object() -> dict[str, list[float]]:
    ctx = topo.current()
    axis = ctx.mesh.axis_names[0]
    writer = topo.axis_index(axis) == 0
    payload = {"cmd": "step", "blob": b"x" * 1000}  # ~1 KiB pickled
    times: dict[str, list[float]] = {"shm": [], "socket": [], "object": []}
    with (
        topo.MessageQueue(axis, writer=0, timeout=60) as shm,
        topo.MessageQueue(axis, writer=0, timeout=60, transport="socket") as sock,
    ):
        for repeat in range(REPEATS + 1):  # the first round warms up
            for name in ("shm", "socket", "object"):
                _barrier(axis)
                start = time.perf_counter()
                for _ in range(MESSAGES):
                    if name == "object":
                        topo.broadcast_object(payload if writer else None, axis)
                    else:
                        mq = shm if name == "shm" else sock
                        if writer:
                            mq.enqueue(payload)
                        else:
                            mq.dequeue(timeout=60)
                _barrier(axis)
                if repeat:
                    times[name].append((time.perf_counter() - start) / MESSAGES)
    return times


def queue_latency() -> dict[str, list[float]]:
    """One-way latency: the writer stamps each message with ``time.perf_counter()`` (one
    system-wide monotonic clock) and paces them 2 ms apart, so nothing queues; each reader
    records arrival - stamp."""
    ctx = topo.current()
    axis = ctx.mesh.axis_names[0]
    writer = topo.axis_index(axis) == 0
    blob = b"x" * 1000
    delays: dict[str, list[float]] = {"shm": [], "socket": [], "object": []}
    with (
        topo.MessageQueue(axis, writer=0, timeout=60) as shm,
        topo.MessageQueue(axis, writer=0, timeout=60, transport="socket") as sock,
    ):
        for name in ("shm", "socket", "object", "shm", "socket", "object"):
            _barrier(axis)
            for i in range(LATENCY_MESSAGES):
                if writer:
                    time.sleep(0.002)
                    msg = {"t": time.perf_counter(), "blob": blob}
                    if name == "object":
                        topo.broadcast_object(msg, axis)
                    else:
                        (shm if name == "shm" else sock).enqueue(msg)
                else:
                    if name == "object":
                        got = topo.broadcast_object(None, axis)
                    else:
                        got = (shm if name == "shm" else sock).dequeue(timeout=60)
                    if i >= 10:  # warm-up messages
                        delays[name].append(time.perf_counter() - got["t"])
    return delays


def tensor_dict_vs_broadcasts() -> dict[str, list[float]]:
    ctx = topo.current()
    axis = ctx.mesh.axis_names[0]
    src = topo.axis_index(axis) == 0
    d = {f"t{i}": torch.randn(4, 16 + i) for i in range(64)}
    times: dict[str, list[float]] = {"dict": [], "broadcasts": []}
    for repeat in range(REPEATS + 1):
        _barrier(axis)
        start = time.perf_counter()
        for _ in range(5):
            topo.broadcast_tensor_dict(d if src else None, axis)
        if repeat:
            times["dict"].append((time.perf_counter() - start) / 5)
        _barrier(axis)
        start = time.perf_counter()
        for _ in range(5):
            for t in d.values():
                topo.broadcast(t, axis)
        if repeat:
            times["broadcasts"].append((time.perf_counter() - start) / 5)
    return times


def gatherv_vs_gather() -> dict[str, list[float]]:
    ctx = topo.current()
    axis = ctx.mesh.axis_names[0]
    n = ctx.mesh.size
    sizes = [1024 * (i + 1) for i in range(n)]  # uneven rows of 256 floats
    x = torch.randn(sizes[topo.axis_index(axis)], 256)
    padded = torch.zeros(max(sizes), 256)
    times: dict[str, list[float]] = {
        "gatherv": [], "gatherv_sizes": [], "broadcast": [], "p2p": [], "padded": []
    }  # fmt: skip
    for repeat in range(REPEATS + 1):
        for name in times:
            _barrier(axis)
            start = time.perf_counter()
            for _ in range(4):
                if name == "gatherv":
                    topo.all_gatherv(x, axis)
                elif name == "gatherv_sizes":
                    topo.all_gatherv(x, axis, sizes=sizes)
                elif name in ("broadcast", "p2p"):
                    topo.all_gatherv(x, axis, sizes=sizes, method=name)  # type: ignore[arg-type]
                else:
                    topo.all_gather(padded, axis)
            if repeat:
                times[name].append((time.perf_counter() - start) / 4)
    return times


def main() -> None:
    mesh = topo.DeviceMesh(x=4)
    med = statistics.median
    lat = topo.spawn(queue_latency, mesh, timeout=600)
    print("1 KiB message, 1 writer -> 3 local readers, one-way latency to the last reader")
    print(f"  (messages paced 2 ms apart; median over {LATENCY_MESSAGES - 10} x 2 messages):")
    worst = {}
    for name in ("shm", "socket", "object"):
        per_message = zip(*(r[name] for r in lat[1:]), strict=True)
        worst[name] = med([max(m) for m in per_message])
    print(f"  MessageQueue (shm)      {worst['shm'] * 1e6:8.1f} us")
    print(f"  MessageQueue (socket)   {worst['socket'] * 1e6:8.1f} us")
    print(f"  broadcast_object (gloo) {worst['object'] * 1e6:8.1f} us")
    print(f"  ratio shm / broadcast_object    = {worst['shm'] / worst['object']:.3f} (goal <= 0.2)")
    print(f"  ratio socket / broadcast_object = {worst['socket'] / worst['object']:.3f}")
    q = topo.spawn(queue_vs_broadcast_object, mesh, timeout=600)[1]  # a reader's view
    print(f"throughput: {MESSAGES} back-to-back 1 KiB messages (median of {REPEATS}):")
    print(f"  MessageQueue (shm)      {med(q['shm']) * 1e6:8.1f} us/message")
    print(f"  MessageQueue (socket)   {med(q['socket']) * 1e6:8.1f} us/message")
    print(f"  broadcast_object (gloo) {med(q['object']) * 1e6:8.1f} us/message")
    print(
        f"  ratio shm / broadcast_object    = {med(q['shm']) / med(q['object']):.3f} (goal <= 0.2)"
    )
    print(f"  ratio socket / broadcast_object = {med(q['socket']) / med(q['object']):.3f}")
    t = topo.spawn(tensor_dict_vs_broadcasts, mesh, timeout=600)[1]
    print("64 small CPU tensors to 3 ranks:")
    print(f"  broadcast_tensor_dict   {med(t['dict']) * 1e3:8.2f} ms")
    print(f"  64 x topo.broadcast     {med(t['broadcasts']) * 1e3:8.2f} ms")
    print(f"  ratio dict / broadcasts = {med(t['dict']) / med(t['broadcasts']):.3f}")
    g = topo.spawn(gatherv_vs_gather, mesh, timeout=600)[0]
    print("all_gatherv of 1024..4096 rows x 256 floats over 4 ranks:")
    print(f"  all_gatherv (sizes exchanged) {med(g['gatherv']) * 1e3:8.2f} ms")
    print(
        f"  all_gatherv (sizes given)     {med(g['gatherv_sizes']) * 1e3:8.2f} ms  (method='auto')"
    )
    print(f"  all_gatherv method=broadcast  {med(g['broadcast']) * 1e3:8.2f} ms")
    print(f"  all_gatherv method=p2p        {med(g['p2p']) * 1e3:8.2f} ms")
    print(f"  all_gather of padded tensors  {med(g['padded']) * 1e3:8.2f} ms")
    print(f"  ratio gatherv(sizes given) / padded all_gather = "
          f"{med(g['gatherv_sizes']) / med(g['padded']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

"""One rank of the two-host test (tests/test_two_hosts.py), run inside a network namespace.

Usage: ``python tests/_two_hosts_rank.py MODE REPORT_DIR TIMEOUT``, with the torchrun
variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
GLOO_SOCKET_IFNAME in the environment. It writes ``REPORT_DIR/rank{RANK}.json`` (JSON, never
pickle) and marker files ``REPORT_DIR/{imported,ready}{RANK}``; it activates only once
``REPORT_DIR/go`` exists, so slow imports on a busy machine do not eat the rendezvous timeout.

MODE ``collectives``: check every collective along "tp" (inside one host), "dp" (across the
hosts) and ("dp", "tp") (the world) against a reference computed from every rank's inputs;
also probe which addresses the rendezvous store's port answers on.
MODE ``loop``: warm up, mark ready, then run collectives until one fails (the test kills a
rank or cuts the link); report the error's type, classes and message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import topo
from topo import DeviceMesh

MESH = DeviceMesh(dp=2, tp=2)
AXES: list[Any] = ["tp", "dp", ("dp", "tp")]
ROWS = 8  # divisible by every group size


def inputs(rank: int) -> torch.Tensor:
    """Rank ``rank``'s input: distinct, exact in float64."""
    return torch.arange(ROWS * 3, dtype=torch.float64).reshape(ROWS, 3) + 1000.0 * (rank + 1)


def obj(rank: int) -> dict[str, Any]:
    return {"rank": rank, "name": f"r{rank}", "values": [rank, rank * rank]}


def _same(got: Any, want: Any) -> str | None:
    """None when equal, else a short description of the difference."""
    if want is None or got is None:
        return None if got is None and want is None else f"got {got!r}, want {want!r}"
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"got {type(got).__name__}, want a tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"
        if not torch.equal(got, want):
            return f"values differ: got {got.flatten()[:6].tolist()}, want {want.flatten()[:6].tolist()}"
        return None
    return None if got == want else f"got {got!r}, want {want!r}"


def check_collectives(rank: int) -> dict[str, str]:
    """Run every collective along every axis; name → "ok" or what went wrong."""
    results: dict[str, str] = {}
    for axis in AXES:
        _check_axis(axis, rank, results)
    _check("world/barrier", lambda: topo.barrier(), None, results)
    return results


def _check(name: str, run: Any, want: Any, results: dict[str, str]) -> None:
    try:
        diff = _same(run(), want)
        results[name] = "ok" if diff is None else f"MISMATCH {diff}"
    except Exception as error:  # recorded: the test shows it
        results[name] = f"ERROR {type(error).__name__}: {error}"


def _check_axis(axis: Any, rank: int, results: dict[str, str]) -> None:
    x = inputs(rank)
    group = MESH.group(axis, rank)
    n = len(group)
    i = MESH.axis_index(axis, rank)
    xs = [inputs(r) for r in group]
    tag = axis if isinstance(axis, str) else "+".join(axis)

    def check(name: str, run: Any, want: Any) -> None:
        _check(f"{tag}/{name}", run, want, results)

    total = torch.stack(xs).sum(0)
    check("all_reduce", lambda: topo.all_reduce(x, axis=axis), total)
    check(
        "all_reduce_max", lambda: topo.all_reduce(x, axis=axis, op="max"), torch.stack(xs).amax(0)
    )
    check("all_gather", lambda: topo.all_gather(x, axis=axis), torch.cat(xs))
    check("all_gather_dim1", lambda: topo.all_gather(x, axis=axis, dim=1), torch.cat(xs, dim=1))
    check("reduce_scatter", lambda: topo.reduce_scatter(x, axis=axis), total.chunk(n)[i])
    check("broadcast", lambda: topo.broadcast(x, axis=axis, src=n - 1), xs[n - 1])
    check("scatter", lambda: topo.scatter(x, axis=axis, src=0), xs[0].chunk(n)[i])
    check(
        "gather",
        lambda: topo.gather(x, axis=axis, dst=n - 1),
        torch.cat(xs) if i == n - 1 else None,
    )
    check(
        "all_to_all",
        lambda: topo.all_to_all(x, axis=axis),
        torch.cat([xs[j].chunk(n)[i] for j in range(n)]),
    )
    ring = [(j, (j + 1) % n) for j in range(n)]
    check("ppermute", lambda: topo.ppermute(x, axis=axis, perm=ring), xs[(i - 1) % n])
    check(
        "shift",
        lambda: topo.shift(x, axis=axis, offset=1, wrap=False),
        torch.zeros_like(x) if i == 0 else xs[i - 1],
    )
    # send/recv in pairs (0→1, 2→3, ...), then back (1→0, 3→2, ...).
    peer = i + 1 if i % 2 == 0 else i - 1

    def send_recv(first: bool) -> torch.Tensor | None:
        if (i % 2 == 0) == first:
            topo.send(x, axis=axis, dst=peer)
            return None
        received: torch.Tensor = topo.recv(x.shape, x.dtype, axis=axis, src=peer)
        return received

    check("send_recv", lambda: send_recv(True), None if i % 2 == 0 else xs[peer])
    check("send_recv_back", lambda: send_recv(False), None if i % 2 else xs[peer])
    check("barrier", lambda: topo.barrier(axis), None)
    check(
        "broadcast_object",
        lambda: topo.broadcast_object(obj(rank), axis=axis, src=n - 1),
        obj(group[n - 1]),
    )
    check(
        "all_gather_object",
        lambda: topo.all_gather_object(obj(rank), axis=axis),
        [obj(r) for r in group],
    )


def probe(host: str, port: int) -> str:
    """Whether a TCP connection to ``host:port`` is accepted here ("open") or not."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return "open"
    except OSError as error:
        return f"closed ({type(error).__name__}: {error})"


def tx_bytes(ifname: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())
    except (OSError, ValueError):
        return -1


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {seconds} s")
        time.sleep(0.02)


def error_report(error: BaseException, started: float) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "classes": [c.__name__ for c in type(error).__mro__],
        "topo_error": isinstance(error, topo.TopoError),
        "message": str(error),
        "time": time.time(),
        "after_s": time.monotonic() - started,
        "traceback": traceback.format_exc(limit=8),
    }


def main() -> None:
    mode, out, timeout = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    rank = int(os.environ["RANK"])
    ifname = os.environ["GLOO_SOCKET_IFNAME"]
    report: dict[str, Any] = {"rank": rank, "mode": mode, "pid": os.getpid()}
    report["start_time"] = time.time()
    report["world"] = repr(topo.World.from_env())
    report["imported_s"] = time.time() - report["start_time"]
    (out / f"imported{rank}").touch()
    wait_for(out / "go", 120.0)  # longer than the test waits for every rank to import
    started = time.monotonic()
    tx_before = tx_bytes(ifname)
    try:
        with MESH.activate(timeout=timeout) as ctx:
            report["activate_s"] = time.monotonic() - started
            report["coords"] = ctx.coords
            if mode == "collectives":
                port = int(os.environ["MASTER_PORT"])
                report["probe"] = {
                    "master_addr": probe(os.environ["MASTER_ADDR"], port),
                    "loopback": probe("127.0.0.1", port),
                }
                report["checks"] = check_collectives(rank)
                report["checked_s"] = time.monotonic() - started
            else:
                world = ("dp", "tp")
                x = inputs(rank)
                topo.all_reduce(x, axis=world)  # creates the communicators
                topo.all_reduce(x, axis="dp")
                topo.all_reduce(x, axis="tp")
                (out / f"ready{rank}").touch()
                ops = 0
                loop_until = time.monotonic() + 4 * timeout
                while time.monotonic() < loop_until:  # the test kills a rank meanwhile
                    topo.all_reduce(x, axis=world)
                    topo.all_reduce(x, axis="dp")
                    topo.all_reduce(x, axis="tp")
                    ops += 3
                report["ops"] = ops
        report["outcome"] = "finished"
        report["closed_s"] = time.monotonic() - started
    except BaseException as error:  # the report carries it to the test
        report["outcome"] = "error"
        report["error"] = error_report(error, started)
    report["tx_bytes"] = tx_bytes(ifname) - tx_before
    report["end_time"] = time.time()
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=repr))
    tmp.replace(out / f"rank{rank}.json")


if __name__ == "__main__":
    main()

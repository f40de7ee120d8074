"""One rank of the attacked job of tests/test_attack.py, run in the job's network namespace.

Usage: ``python tests/_attack_rank.py REPORT_DIR TIMEOUT`` with torchrun's variables (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), GLOO_SOCKET_IFNAME and, for the runs with a secret,
TOPO_SECRET. One rank arrives late at each step, so that what the other wrote sits in the
store while the attacker looks. Writes ``REPORT_DIR/rank{RANK}.json`` (JSON): how the rank ended.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import topo

LATE = 2.0  # seconds one rank arrives after the other at each step


def job(rank: int, timeout: float, seen: dict[str, Any]) -> None:
    with topo.DeviceMesh(tp=2).activate(timeout=timeout) as ctx:
        seen["activated"] = True
        if rank == 0:
            time.sleep(LATE)  # rank 1's gloo record (the one rank 0 connects to) waits
        obj = {"msg": "hello " * 40, "t": torch.arange(4)}
        got = topo.broadcast_object(obj if rank == 0 else None, "tp", src=0)
        seen["object_equal"] = got["msg"] == obj["msg"] and torch.equal(got["t"], obj["t"])
        passed = []
        for i in range(3):
            if rank == 1:
                time.sleep(LATE)  # rank 0 waits at the barrier
            start = time.time()
            ctx.coordinator.barrier(f"step{i}")
            passed.append(time.time() - start)
        seen["barrier_waits"] = passed
        seen["gathered"] = ctx.coordinator.all_gather_json({"rank": rank})
        seen["sum"] = topo.all_reduce(torch.ones(2), "tp").tolist()


def main() -> None:
    out, timeout = Path(sys.argv[1]), float(sys.argv[2])
    rank = int(os.environ["RANK"])
    seen: dict[str, Any] = {"rank": rank}
    try:
        job(rank, timeout, seen)
        seen["outcome"] = "ok"
    except BaseException as error:
        seen.update(
            outcome="error", type=type(error).__name__, topo_error=isinstance(error, topo.TopoError),
            message=str(error)[:600], traceback=traceback.format_exc()[-2000:],
        )  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()

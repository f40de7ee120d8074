"""One rank of a fault trial, started by tests/test_faults.py with torchrun-style variables.

Usage: python tests/_fault_rank.py SCENARIO REPORT_PATH

It writes a JSON report (never pickle): what the rank saw, which topo error, how long it took.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import topo


def _report(path: Path, **fields: object) -> None:
    path.write_text(json.dumps(fields))


def main() -> None:
    scenario, report = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    timeout = float(os.environ.get("FAULT_TIMEOUT", "4"))
    mesh = topo.DeviceMesh(dp=2, tp=2)
    start = time.monotonic()
    try:
        with mesh.activate(timeout=timeout):
            if scenario == "barrier-loop":
                Path(f"{report}.ready").write_text("1")
                start = time.monotonic()
                end = start + 120
                while time.monotonic() < end:
                    topo.barrier()
                    time.sleep(0.01)
            elif scenario == "activate":
                topo.all_reduce(torch.ones(1), axis="tp")
        _report(report, rank=rank, ok=True, elapsed=time.monotonic() - start)
    except BaseException as error:
        _report(
            report,
            rank=rank,
            ok=False,
            type=type(error).__name__,
            mro=[cls.__name__ for cls in type(error).__mro__],
            message=str(error),
            elapsed=time.monotonic() - start,
            traceback=traceback.format_exc(),
        )


if __name__ == "__main__":
    main()

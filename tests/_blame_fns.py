"""Rank functions for tests/test_blame.py: a loop of collectives where one rank (the victim)
misbehaves at one step — skips a call, leaves the loop, dies, or calls another collective.

Module level, so ``topo.spawn`` can pickle them; ``tests/test_blame.py`` also runs this file as
a script, one process per rank with torchrun's variables, for explicit worlds:
``python tests/_blame_fns.py SCENARIO VICTIM REPORT_PATH`` (it writes a JSON report).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any

import torch

import topo

STEPS = 8
AT = 4  # the step at which the victim misbehaves


def loop(scenario: str, victim: int) -> list[float]:
    """Every rank: STEPS steps of an all_reduce over tp then dp (``skip``, ``early``) or
    over the whole mesh (``kill``, ``mismatch``); the victim misbehaves at step AT."""
    rank = topo.current().rank
    sums = []
    x = torch.ones(4) * rank
    for step in range(STEPS):
        mine = rank == victim and step == AT
        if scenario == "early" and mine:
            break  # leaves the loop: its activation closes while the others wait
        if scenario == "kill" and mine:
            os.kill(os.getpid(), signal.SIGKILL)
        if scenario in ("skip", "early"):
            if not (scenario == "skip" and mine):  # skip: one tp call fewer than the others
                sums.append(float(topo.all_reduce(x, "tp").sum()))
            sums.append(float(topo.all_reduce(x, "dp").sum()))
        elif scenario == "mismatch" and mine:
            sums.append(float(topo.all_gather(x, ("dp", "tp")).sum()))
        else:
            sums.append(float(topo.all_reduce(x, ("dp", "tp")).sum()))
    return sums


def main() -> None:
    scenario, victim, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    timeout = float(os.environ.get("BLAME_TIMEOUT", "6"))
    out: dict[str, Any] = {"rank": int(os.environ["RANK"])}
    start = time.monotonic()
    try:
        with topo.DeviceMesh(dp=2, tp=2).activate(timeout=timeout):
            out["sums"] = loop(scenario, victim)
        out["outcome"] = "ok"
    except Exception as error:
        out.update(outcome="error", type=type(error).__name__, message=str(error),
                   culprits=list(getattr(error, "culprits", [])),
                   traceback=traceback.format_exc()[-1500:])  # fmt: skip
    out["seconds"] = round(time.monotonic() - start, 2)
    with open(report, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()

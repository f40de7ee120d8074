"""A real attacker on the cluster network: a job in one network namespace, an intruder who can
reach its store from a second one.

The job (tests/_attack_rank.py) runs 2 ranks in namespace B, MASTER_ADDR on B's veth address,
gloo on the veth. The attacker (tests/_attacker.py) runs in namespace A and, as a store client,
lists the job's keys and rewrites every value it can (A's address is the lower one: gloo's
rank that reads a record naming a lower address than its own dials it, so the relay gets the
connection):

- ``relay``: gloo's address records, pointed at a relay of its own that forwards to the real
  peer and swaps the object ``topo.broadcast_object`` sends for a pickle that would write a
  canary file;
- ``forge``: everything else — forged barrier completions, gathers and broadcasts.

Each attack runs with and without ``TOPO_SECRET``. With it, every rank ends with
``AuthenticationError``; either way no code runs (the canary never appears), every rank ends
with a topo error or success (no raw exception), and none outlives its bound. The outcome table
is printed (``pytest -s``) and quoted in docs/security.md.

Needs root and a working ``ip netns``; skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _netns
import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
RANK = Path(__file__).resolve().parent / "_attack_rank.py"
ATTACKER = Path(__file__).resolve().parent / "_attacker.py"
TIMEOUT = 12.0  # the job's activation timeout
BOUND = 90.0  # start-up of python + torch on a busy machine, the timeout, and teardown
_OUTCOMES: dict[tuple[str, bool], dict[str, Any]] = {}


@pytest.fixture(scope="module")
def hosts() -> Any:
    reason = _netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with _netns.two_hosts() as built:
        yield built


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(rank: int, hosts: _netns.TwoHosts, port: int, secret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPO_", "MASTER_", "GLOO_"))}
    env.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR=hosts.b.addr, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=hosts.b.ifname,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )  # fmt: skip
    if secret:
        env["TOPO_SECRET"] = "attack-test-secret-0123456789"
    return env


def run_attack(hosts: _netns.TwoHosts, mode: str, secret: bool) -> dict[str, Any]:
    """The job and the attacker; every process ended before it returns."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix=f"topo-attack-{mode}-") as tmp:
        out = Path(tmp)
        canary = out / "canary"
        procs: list[subprocess.Popen[bytes]] = []
        start = time.monotonic()
        try:
            attacker = hosts.a.exec_argv([
                sys.executable, str(ATTACKER), mode, hosts.b.addr, str(port), hosts.a.addr,
                str(canary), str(TIMEOUT + 25), str(out / "attacker.json"),
            ])  # fmt: skip
            env = _env(0, hosts, port, secret=False)
            with open(out / "attacker.txt", "wb") as log:
                procs.append(subprocess.Popen(attacker, env=env, stdout=log, stderr=log))
            for rank in (0, 1):
                argv = hosts.b.exec_argv([sys.executable, str(RANK), tmp, str(TIMEOUT)])
                with open(out / f"out{rank}.txt", "wb") as log:
                    procs.append(subprocess.Popen(
                        argv, env=_env(rank, hosts, port, secret), stdout=log, stderr=log,
                        stdin=subprocess.DEVNULL,
                    ))  # fmt: skip
            deadline = start + BOUND
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        finally:
            for proc in procs:  # only the processes this test started
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        ranks = {}
        for rank in (0, 1):
            path = out / f"rank{rank}.json"
            ranks[rank] = json.loads(path.read_text()) if path.exists() else {"outcome": "none"}
            ranks[rank]["output"] = (out / f"out{rank}.txt").read_text(errors="replace")[-1500:]
        attack = out / "attacker.json"
        return {
            "ranks": ranks,
            "attacker": json.loads(attack.read_text()) if attack.exists() else {},
            "attacker_output": (out / "attacker.txt").read_text(errors="replace")[-1500:],
            "canary": canary.exists(),
            "seconds": time.monotonic() - start,
            "returncodes": [p.returncode for p in procs],
        }


def _summary(result: dict[str, Any]) -> str:
    cells = []
    for rank, report in result["ranks"].items():
        what = report.get("type") if report["outcome"] == "error" else report["outcome"]
        cells.append(f"rank {rank}: {what}")
    attacker = result["attacker"]
    did = ", ".join(f"{k} {attacker.get(k, 0)}" for k in ("records", "relayed", "swapped",
                                                          "barriers", "rewritten"))  # fmt: skip
    return f"{'; '.join(cells)} | attacker: {did} | code ran: {result['canary']}"


@pytest.mark.parametrize("secret", [True, False], ids=["secret", "no-secret"])
@pytest.mark.parametrize("mode", ["relay", "forge"])
def test_an_intruder_runs_no_code_and_with_the_secret_forges_nothing(
    hosts: _netns.TwoHosts, mode: str, secret: bool
) -> None:
    result = run_attack(hosts, mode, secret)
    _OUTCOMES[(mode, secret)] = result
    print(f"\n{mode:>5} {'with' if secret else 'without'} secret: {_summary(result)}")
    detail = json.dumps(result, indent=1, default=str)[-6000:]
    assert not result["canary"], detail  # no code ran, ever
    assert result["seconds"] < BOUND, detail
    assert all(code is not None for code in result["returncodes"]), detail
    for report in result["ranks"].values():
        assert report["outcome"] in ("ok", "error"), detail  # every rank ended and reported
        if report["outcome"] == "error":
            assert report["topo_error"], detail  # a TopoError, never a raw exception
    attacker = result["attacker"]
    assert attacker.get("keys", 0) > 0, detail  # it did reach the store
    if secret:
        for report in result["ranks"].values():
            assert report.get("type") == "AuthenticationError", detail
    if mode == "relay":
        assert attacker.get("records", 0) > 0, detail  # gloo's records were rewritten

"""Two hosts for real: a 2x2 mesh as 2 ranks on each of two network namespaces.

Namespaces A and B are joined by a veth pair on a private /30 that exists only inside them
(tests/_netns.py lists the ``ip`` commands). Every rank is ``ip netns exec NS python
tests/_two_hosts_rank.py`` with torchrun's variables: RANK, WORLD_SIZE=4, LOCAL_RANK,
LOCAL_WORLD_SIZE=2, MASTER_ADDR = A's veth address, MASTER_PORT, GLOO_SOCKET_IFNAME = the
namespace's veth end. Ranks 0, 1 run on A (they host and reach the store), ranks 2, 3 on B; so
"tp" groups stay inside a host, "dp" groups cross the veth, ("dp", "tp") is the world.

Needs root and a working ``ip netns``; skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _netns
import pytest

# Every wait below is bounded on its own; the timeout mark is the last line of defence.
pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = Path(__file__).resolve().parent / "_two_hosts_rank.py"
WORLD_SIZE = 4
LOCAL_WORLD_SIZE = 2
#: Activation timeout (seconds) of the collectives job and of the job that loses a rank.
COLLECTIVES_TIMEOUT = 20.0
KILL_TIMEOUT = 6.0
#: A survivor must end within KILL_TIMEOUT + this after the kill.
MARGIN = 10.0  # generous: the machine running the suite may be heavily loaded
#: The rank killed: LOCAL_RANK 1 on the second host (not the store's host).
KILLED = 3
#: Bound on starting Python + torch in the four processes on a busy machine.
IMPORT_BOUND = 90.0
#: Bound on activating and warming up, from the go signal until every rank is ready.
READY_BOUND = 60.0
#: Extra bound on a process's exit after its last wait (tearing torch down can take seconds
#: on a loaded machine); a rank still alive after it is killed and the test fails.
EXIT_BOUND = 30.0
#: Checks per rank: 16 per axis for 3 axes, plus the world barrier.
CHECKS_PER_RANK = 16 * 3 + 1


@dataclass
class Job:
    """What one run of the four ranks left behind."""

    reports: dict[int, dict[str, Any]]
    outputs: dict[int, str]
    returncodes: dict[int, int | None]
    fault_time: float | None
    wall_s: float
    #: Seconds from starting the processes until all four had imported torch and topo.
    import_s: float

    def describe(self) -> str:
        lines = [f"wall {self.wall_s:.1f} s, import {self.import_s:.1f} s"]
        for rank in range(WORLD_SIZE):
            report = self.reports.get(rank, {})
            error = report.get("error", {})
            when = ""
            if self.fault_time is not None and "time" in error:
                when = f" {error['time'] - self.fault_time:.2f} s after the fault"
            if self.fault_time is not None and "end_time" in report:
                when += f", reported {report['end_time'] - self.fault_time:.2f} s after it"
            lines.append(
                f"rank {rank}: rc={self.returncodes.get(rank)} outcome={report.get('outcome')}"
                f"{when} error={error.get('message')!r}\n  output: "
                f"{self.outputs.get(rank, '')[-1500:]!r}"
            )
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank_env(rank: int, host: _netns.Host, master: _netns.Host, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOPO_", "MASTER_", "GLOO_", "TORCHELASTIC_", "SLURM_", "OMPI_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    }
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank % LOCAL_WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(LOCAL_WORLD_SIZE),
        MASTER_ADDR=master.addr,
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME=host.ifname,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    return env


def _wait_files(paths: list[Path], procs: dict[int, subprocess.Popen[bytes]], bound: float) -> None:
    deadline = time.monotonic() + bound
    while not all(p.exists() for p in paths):
        dead = {r: p.returncode for r, p in procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"rank(s) {dead} exited before writing {[p.name for p in paths]}")
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise RuntimeError(f"{missing} did not appear within {bound} s")
        time.sleep(0.02)


#: A fault injected into a running job: called with the rank processes.
Fault = Callable[[dict[int, subprocess.Popen[bytes]]], None]


def run_job(hosts: _netns.TwoHosts, mode: str, timeout: float, fault: Fault | None = None) -> Job:
    """Run the four ranks of ``mode``; once all are ready (inside their loop of collectives),
    call ``fault`` with the processes. Every process is ended (killed if need be) before this
    returns."""
    start = time.monotonic()
    port = _free_port()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    fault_time = None
    import_s = float("nan")
    with tempfile.TemporaryDirectory(prefix=f"topo-two-hosts-{mode}-") as tmp:
        out = Path(tmp)
        try:
            for rank in range(WORLD_SIZE):
                host = hosts.a if rank < LOCAL_WORLD_SIZE else hosts.b
                argv = host.exec_argv([sys.executable, str(RANK_SCRIPT), mode, tmp, str(timeout)])
                with open(out / f"out{rank}.txt", "wb") as log:
                    procs[rank] = subprocess.Popen(
                        argv,
                        env=_rank_env(rank, host, hosts.a, port),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
            _wait_files([out / f"imported{r}" for r in procs], procs, IMPORT_BOUND)
            import_s = time.monotonic() - start
            (out / "go").touch()
            if fault is not None:
                ready = [out / f"ready{r}" for r in procs]
                _wait_files(ready, procs, READY_BOUND)
                time.sleep(0.2)  # well inside the loop of collectives
                fault_time = time.time()
                fault(procs)
            deadline = time.monotonic() + 2 * timeout + MARGIN + EXIT_BOUND
            for proc in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        finally:
            for proc in procs.values():  # only the processes this test started
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        reports = {}
        for rank in procs:
            path = out / f"rank{rank}.json"
            if path.exists():
                reports[rank] = json.loads(path.read_text())
        outputs = {r: (out / f"out{r}.txt").read_text(errors="replace") for r in procs}
    returncodes = {r: p.returncode for r, p in procs.items()}
    return Job(reports, outputs, returncodes, fault_time, time.monotonic() - start, import_s)


def _kill(hosts: _netns.TwoHosts) -> Fault:
    def kill(procs: dict[int, subprocess.Popen[bytes]]) -> None:
        os.kill(procs[KILLED].pid, signal.SIGKILL)  # a process this test started

    return kill


def _cut(hosts: _netns.TwoHosts) -> Fault:
    """The link between the hosts goes down mid-job (no reset reaches anyone: a partition)."""

    def cut(procs: dict[int, subprocess.Popen[bytes]]) -> None:
        _netns.set_link(hosts.a, up=False)

    return cut


#: The jobs: mode of the rank script, activation timeout, the fault injected once all are ready.
JOBS: dict[str, tuple[str, float, Callable[[_netns.TwoHosts], Fault] | None]] = {
    "collectives": ("collectives", COLLECTIVES_TIMEOUT, None),
    "kill": ("loop", KILL_TIMEOUT, _kill),
    "partition": ("loop", KILL_TIMEOUT, _cut),
}


def _run_on_own_hosts(name: str) -> Job:
    mode, timeout, fault = JOBS[name]
    with _netns.two_hosts() as hosts:
        return run_job(hosts, mode, timeout, None if fault is None else fault(hosts))


@pytest.fixture(scope="module")
def jobs() -> Iterator[dict[str, Job | BaseException]]:
    """Run every job at once, each on its own pair of namespaces (most of a job's time is
    starting four Python processes; the partition job also waits out its timeout)."""
    reason = _netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    before = _netns.netns_list()
    results: dict[str, Job | BaseException] = {}
    with ThreadPoolExecutor(len(JOBS)) as pool:
        futures = {name: pool.submit(_run_on_own_hosts, name) for name in JOBS}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as error:  # raised by the tests that use this job
                results[name] = error
    yield results
    # Other programs may add namespaces meanwhile: compare only the ones this process made.
    mine = f"-{os.getpid()}-"
    left = sorted(name for name in _netns.netns_list() - before if mine in name)
    assert not left, f"namespaces left behind: {left}"


def _job(jobs: dict[str, Job | BaseException], name: str) -> Job:
    job = jobs[name]
    if isinstance(job, BaseException):
        raise job
    return job


@pytest.fixture
def collectives_job(jobs: dict[str, Job | BaseException]) -> Job:
    return _job(jobs, "collectives")


@pytest.fixture
def kill_job(jobs: dict[str, Job | BaseException]) -> Job:
    return _job(jobs, "kill")


@pytest.fixture
def partition_job(jobs: dict[str, Job | BaseException]) -> Job:
    return _job(jobs, "partition")


def test_every_collective_across_two_hosts(collectives_job: Job) -> None:
    job = collectives_job
    assert sorted(job.reports) == list(range(WORLD_SIZE)), job.describe()
    for rank, report in job.reports.items():
        assert report["outcome"] == "finished", job.describe()
        assert job.returncodes[rank] == 0, job.describe()
        assert (
            f"rank={rank}, world_size=4, local_rank={rank % 2}, local_world_size=2, "
            f"master_addr='{_netns.ADDR_A}'" in report["world"]
        )
        assert report["coords"] == {"dp": rank // 2, "tp": rank % 2}
        checks = report["checks"]
        bad = {name: result for name, result in checks.items() if result != "ok"}
        assert not bad, f"rank {rank}: {bad}"
        assert len(checks) == CHECKS_PER_RANK
        # The "dp" collectives crossed the veth pair: bytes left through it on every host.
        assert report["tx_bytes"] > 0
        # Every rank reached the store at MASTER_ADDR (ranks 2, 3 from the other namespace).
        assert report["probe"]["master_addr"] == "open", report["probe"]


def test_store_listens_only_on_master_addr(collectives_job: Job) -> None:
    """With MASTER_ADDR = A's veth address, the store's port must not answer on A's loopback
    (ranks 0 and 1 run on A and probe 127.0.0.1:MASTER_PORT while the store is up)."""
    job = collectives_job
    assert sorted(job.reports) == list(range(WORLD_SIZE)), job.describe()
    for rank in (0, 1):
        probe = job.reports[rank]["probe"]
        assert probe["master_addr"] == "open", probe
        assert probe["loopback"] != "open", (
            f"rank {rank}: the store at MASTER_ADDR={_netns.ADDR_A} also answers on "
            f"127.0.0.1 ({probe})"
        )


def _survivors(job: Job) -> dict[int, dict[str, Any]]:
    return {r: rep for r, rep in job.reports.items() if r != KILLED}


def test_killed_rank_ends_every_survivor_with_a_topo_error(kill_job: Job) -> None:
    job = kill_job
    assert job.fault_time is not None
    assert job.returncodes[KILLED] == -signal.SIGKILL, job.describe()
    survivors = _survivors(job)
    assert sorted(survivors) == [r for r in range(WORLD_SIZE) if r != KILLED], job.describe()
    for rank, report in survivors.items():
        assert job.returncodes[rank] == 0, job.describe()  # ended on its own, not killed
        assert report["outcome"] == "error", job.describe()
        error = report["error"]
        assert error["topo_error"], f"rank {rank} raised {error['classes']}: {error['message']}"
        # Bounded: every survivor gave up within the timeout (+ margin) after the kill.
        assert error["time"] - job.fault_time <= KILL_TIMEOUT + MARGIN, job.describe()


def _names(message: str, ranks: set[int]) -> bool:
    """Whether ``message`` names one of ``ranks`` as a rank ("rank 3", "rank(s) [2, 3]"), not
    merely inside the group's list ("global ranks [0, 1, 2, 3]")."""
    for match in re.finditer(r"\brank(?:\(s\))?\s+\[?((?:\d+,\s*)*\d+)", message):
        if {int(r) for r in re.split(r",\s*", match.group(1))} & ranks:
            return True
    return False


def test_killed_rank_is_named_by_every_survivor(kill_job: Job) -> None:
    """What should happen: each survivor's error says that rank 3 died or is missing."""
    survivors = _survivors(kill_job)
    assert survivors, kill_job.describe()
    unnamed = {
        r: rep.get("error", {}).get("message", "")
        for r, rep in survivors.items()
        if not _names(rep.get("error", {}).get("message", ""), {KILLED})
    }
    assert not unnamed, f"these survivors do not name rank {KILLED}: {unnamed}"


def test_partition_ends_every_rank_with_a_topo_error(partition_job: Job) -> None:
    """The veth link goes down mid-job: no rank sees a reset, so every rank on both sides must
    give up on its own within the timeout (+ margin), with a topo error."""
    job = partition_job
    assert job.fault_time is not None
    assert sorted(job.reports) == list(range(WORLD_SIZE)), job.describe()
    for rank, report in job.reports.items():
        assert job.returncodes[rank] == 0, job.describe()
        assert report["outcome"] == "error", job.describe()
        error = report["error"]
        assert error["topo_error"], f"rank {rank} raised {error['classes']}: {error['message']}"
        assert error["time"] - job.fault_time <= KILL_TIMEOUT + MARGIN, job.describe()


@pytest.mark.xfail(
    strict=False,
    raises=AssertionError,
    reason="usually passes (the roll call names the other side); but a rank whose own group's "
    "peer is stuck in a collective with the other side names that peer — truly its waiting "
    "point — not the other side behind it",
)
def test_partition_names_the_other_side(partition_job: Job) -> None:
    """What should happen: each rank's error names a rank of the other host as the one it
    waited for (ranks 0, 1 on A; 2, 3 on B)."""
    reports = partition_job.reports
    assert sorted(reports) == list(range(WORLD_SIZE)), partition_job.describe()
    unnamed = {}
    for rank, report in reports.items():
        other = {2, 3} if rank < LOCAL_WORLD_SIZE else {0, 1}
        message = report.get("error", {}).get("message", "")
        if not _names(message, other):
            unnamed[rank] = message
    assert not unnamed, f"these ranks do not name a rank on the other host: {unnamed}"

"""Two "hosts" on one machine: two network namespaces joined by a veth pair (root only).

The pair lives only inside the two namespaces (it is created in the first and its peer end
moved straight into the second), on a private /30 that no other interface carries; nothing is
routed to or from the machine's own namespace. Used by tests/test_two_hosts.py.

The ``ip`` commands, in order (``A``/``B`` are the namespace names, ``va``/``vb`` the ends)::

    ip netns add A
    ip netns add B
    ip -n A link add va type veth peer name vb netns B
    ip -n A addr add 10.231.7.1/30 dev va
    ip -n B addr add 10.231.7.2/30 dev vb
    ip -n A link set lo up
    ip -n B link set lo up
    ip -n A link set va up
    ip -n B link set vb up
    ...                                   # ip netns exec A python ..., ip netns exec B python ...
    ip netns del A                        # also removes the veth pair
    ip netns del B
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

#: Private /30 that exists only between the two namespaces.
ADDR_A = "10.231.7.1"
ADDR_B = "10.231.7.2"
PREFIX = 30
#: veth ends (interface names are per namespace, so fixed names never collide).
IF_A = "topoveth0"
IF_B = "topoveth1"

#: Every ``ip`` call is bounded.
IP_TIMEOUT = 10.0


@dataclass
class Host:
    """One namespace: its name, veth end and address."""

    netns: str
    ifname: str
    addr: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class TwoHosts:
    """The two namespaces and the ``ip`` commands that built them (with their durations)."""

    a: Host
    b: Host
    log: list[tuple[str, float]] = field(default_factory=list)


def _ip(args: Sequence[str], log: list[tuple[str, float]] | None = None) -> None:
    start = time.monotonic()
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if log is not None:
        log.append(("ip " + " ".join(args), time.monotonic() - start))
    if result.returncode != 0:
        raise OSError(
            f"`ip {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}"
        )


def netns_list() -> set[str]:
    """Names of the network namespaces ``ip netns list`` shows."""
    result = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be built here, or None when they can (tries one for real)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (`ip netns add` requires CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"topo-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        _ip(["netns", "add", probe])
    except (OSError, subprocess.SubprocessError) as error:
        return f"`ip netns add` does not work here: {error}"
    reason = None
    try:
        _ip(f"-n {probe} link add {IF_A} type veth peer name {IF_B}".split())
    except (OSError, subprocess.SubprocessError) as error:
        reason = f"veth pairs cannot be created here: {error}"
    try:
        _ip(["netns", "del", probe])
    except (OSError, subprocess.SubprocessError) as error:
        return f"`ip netns del` does not work here: {error}"
    return reason


def set_link(host: Host, up: bool) -> None:
    """Bring ``host``'s veth end up or down (down: the hosts cannot reach each other)."""
    _ip(["-n", host.netns, "link", "set", host.ifname, "up" if up else "down"])


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Build namespaces A and B joined by a veth pair; always delete them afterwards.

    The caller must have ended every process it started inside them before leaving (a
    namespace outlives ``ip netns del`` while a process is still in it).
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    hosts = TwoHosts(
        Host(f"topo-a-{tag}", IF_A, ADDR_A),
        Host(f"topo-b-{tag}", IF_B, ADDR_B),
    )
    created: list[str] = []
    a, b = hosts.a, hosts.b
    try:
        for host in (a, b):
            _ip(f"netns add {host.netns}".split(), hosts.log)
            created.append(host.netns)
        veth = f"-n {a.netns} link add {a.ifname} type veth peer name {b.ifname} netns {b.netns}"
        _ip(veth.split(), hosts.log)
        for host in (a, b):
            _ip(
                f"-n {host.netns} addr add {host.addr}/{PREFIX} dev {host.ifname}".split(),
                hosts.log,
            )
        for host in (a, b):
            _ip(f"-n {host.netns} link set lo up".split(), hosts.log)
        for host in (a, b):
            _ip(f"-n {host.netns} link set {host.ifname} up".split(), hosts.log)
        yield hosts
    finally:
        errors = []
        for name in created:
            try:
                _ip(["netns", "del", name], hosts.log)
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(str(error))
        if errors:
            raise OSError("cleaning up the test namespaces failed: " + "; ".join(errors))

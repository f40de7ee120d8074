"""Waiting for every rank actor's reply, and naming the rank that failed.

The driver waits on the ranks' replies with ``ray.wait`` in steps of at most a second, so
every wait ends by its deadline. A rank that replies with an error of its own, or whose actor
died (Ray's reason: killed, out of memory, its node lost), is the cause at once; a rank that
only saw a peer vanish (a communication timeout, a lost store) is not: then the driver keeps
listening a few seconds for the others, as ``topo.spawn`` does, and blames the rank the
survivors' roll calls name. The caller stops every actor before the error goes up.

Example::

    refs = [actor.run.remote(payload) for actor in handles]
    results = collect(refs, mesh, deadline=time.monotonic() + 60, what="MeshActors.run")
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from topo.errors import RankFailedError
from topo.mesh import DeviceMesh
from topo.ray._require import require_ray

__all__ = ["collect", "death_reason"]

#: The key-value lines of Ray's actor-death message (``pid: 123``); the rest is the reason.
_FACT = re.compile(r"^(\w+): (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def death_reason(error: BaseException) -> str:
    """Ray's reason for an actor's death, on one line, with its pid and address.

    Example::

        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as error:
            print(death_reason(error))   # The actor is dead because it was killed by `ray.kill`.
    """
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    facts: dict[str, str] = {}
    words: list[str] = []
    for line in filter(None, lines):
        fact = _FACT.match(line)
        if fact and " " not in fact.group(1):
            facts[fact.group(1)] = fact.group(2)
        else:
            words.append(line)
    where = ", ".join(f"{k} {facts[k]}" for k in ("pid", "ip") if k in facts)
    reason = " ".join(words) or type(error).__name__
    return f"{reason} ({where})" if where else reason


def collect(
    refs: Sequence[Any], mesh: DeviceMesh, *, deadline: float | None, what: str
) -> list[Any]:
    """Every rank's reply value, in rank order; :class:`topo.RankFailedError` naming the
    cause when a rank raised or its actor died, or when ``deadline`` (``time.monotonic()``;
    None: none) passes first.

    Example::

        collect([a.ping.remote() for a in handles], mesh, deadline=None, what="ping")
    """
    from topo.launch import _PEER_ERRORS, _SETTLE_SECONDS  # torch: only once ranks run

    ray = require_ray()
    pending = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, str, list[int]]] = {}  # rank -> (text, traceback, culprits)
    died: dict[int, str] = {}
    settle_until: float | None = None  # after a peer's error: gather the others' too
    while pending:
        now = time.monotonic()
        if settle_until is not None and now >= settle_until:
            break
        if deadline is not None and now >= deadline:
            _raise_timeout(mesh, what, sorted(pending.values()), errors, died)
        ends = [t for t in (deadline, settle_until) if t is not None]
        step = min([1.0, *(t - now for t in ends)])
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(step, 0.0))
        for ref in ready:
            rank = pending.pop(ref)
            try:
                reply = ray.get(ref, timeout=max(step, 1.0))
            except _unavailable(ray) as error:  # alive, perhaps, but out of reach
                died[rank] = f"unreachable, not known to be dead: {death_reason(error)}"
                settle_until = time.monotonic()
                continue
            except ray.exceptions.RayActorError as error:
                died[rank] = death_reason(error)
                settle_until = time.monotonic()  # the cause is known
                continue
            except ray.exceptions.RayError as error:
                errors[rank] = _ray_error(error)
                settle_until = time.monotonic()
                continue
            if reply[0] == "ok":
                results[rank] = reply[1]
                continue
            text, trace, culprits = reply[1], reply[2], [int(r) for r in reply[3]]
            errors[rank] = (text, trace, culprits)
            if text.split(":")[0] not in _PEER_ERRORS:
                settle_until = time.monotonic()  # an error of its own: the cause
            elif settle_until is None:
                settle_until = time.monotonic() + _SETTLE_SECONDS
    if errors or died:
        _raise_cause(mesh, what, errors, died)
    return [results[r] for r in range(len(refs))]


def _unavailable(ray: Any) -> type[BaseException] | tuple[()]:
    """Ray's error for an actor it cannot reach for now (a subclass of ``RayActorError``, Ray
    >= 2.22; ``()`` before, which catches nothing)."""
    found: type[BaseException] | None = getattr(ray.exceptions, "ActorUnavailableError", None)
    return () if found is None else found


def _ray_error(error: BaseException) -> tuple[str, str, list[int]]:
    """A Ray error that is not a death (a task whose argument could not be loaded)."""
    text = _ANSI.sub("", str(error))
    hint = ""
    if "ModuleNotFoundError" in text or "No module named" in text:
        hint = (
            "; fix by making fn's module importable by Ray's workers: define fn in the driver "
            "script, put its directory on their path (runtime_env={'env_vars': {'PYTHONPATH': "
            "...}} or {'working_dir': ...}), or install it"
        )
    first = next((line for line in text.splitlines() if "Error" in line), text.split("\n")[0])
    return (f"{type(error).__name__}: {first.strip()[:300]}{hint}", text, [])


def _raise_cause(
    mesh: DeviceMesh,
    what: str,
    errors: dict[int, tuple[str, str, list[int]]],
    died: dict[int, str],
) -> NoReturn:
    """Blame the cause, not the first to notice: a dead actor, then a rank with an error of
    its own, then the rank the survivors' roll calls name, then the lowest rank."""
    from topo.launch import raise_cause

    others = "; ".join(f"rank {r}: {errors[r][0].splitlines()[0][:160]}" for r in sorted(errors))
    seen = f"; what the other ranks saw — {others}" if others else ""
    if died:
        rank = min(died)
        how = (
            "could not be reached in {what}: its Ray actor does not answer" if
            died[rank].startswith("unreachable") else
            "died in {what}: its Ray actor is gone"
        ).format(what=what)  # fmt: skip
        raise RankFailedError(
            f"rank {rank} of {mesh!r} {how} — {died[rank]}; the other ranks were stopped{seen}",
            rank=rank,
        )
    raise_cause(mesh, errors, where=f" in {what}")


def _raise_timeout(
    mesh: DeviceMesh,
    what: str,
    pending: list[int],
    errors: dict[int, tuple[str, str, list[int]]],
    died: dict[int, str],
) -> NoReturn:
    if errors or died:
        _raise_cause(mesh, what, errors, died)
    raise RankFailedError(
        f"{what} timed out: rank(s) {pending} of {mesh!r} had not replied by the deadline; the "
        f"ranks were stopped. Fix by raising timeout= or looking for a rank that waits on a "
        f"collective the others never call",
        rank=pending[0] if len(pending) == 1 else None,
    )

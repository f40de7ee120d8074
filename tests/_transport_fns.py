"""Functions that the transport tests run on every rank with ``topo.spawn`` (module level).

Inputs are built here from the global rank, so the parent can rebuild every rank's inputs and
compute its own reference; the ranks only run topo and report what they got.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

import topo

WAIT = 60.0


def uneven_input(rank: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank ``rank``'s input whose size along ``dim`` is ``rank % 3`` (0 included)."""
    shape = [2, 3, 2]
    shape[dim] = rank % 3
    n = shape[0] * shape[1] * shape[2]
    return (torch.arange(n, dtype=torch.float64).reshape(shape) + 100 * rank).to(dtype)


def rs_input(rank: int, total: int) -> torch.Tensor:
    return torch.arange(total * 3, dtype=torch.float32).reshape(total, 3) * (rank + 1)


def tensor_dict(rank: int) -> dict[str, Any]:
    """A nested dict: several dtypes, a 0-d, an empty, a non-contiguous and a big tensor,
    scalars of every JSON kind, lists and tuples."""
    r = rank
    return {
        "hidden": torch.arange(24, dtype=torch.float32).reshape(4, 6) + r,
        "residual": (torch.arange(8, dtype=torch.float64) * -r).reshape(2, 4).t(),
        "ids": torch.arange(7, dtype=torch.int64) + r,  # 7: never divides by 2
        "mask": torch.arange(6) % (r + 2) == 0,
        "half": torch.full((3, 2), r, dtype=torch.bfloat16),
        "c": torch.complex(torch.ones(4), torch.full((4,), float(r))),
        "zero_d": torch.tensor(r + 0.5),
        "empty": torch.empty(0, 3),
        "big": torch.arange(300_000, dtype=torch.float32) * (r + 1),  # > 1 MiB: moved alone
        "meta": {"step": 3 + r, "lr": 0.5, "name": f"rank{r}", "ok": True, "none": None},
        "layers": [torch.ones(2) * r, {"k": torch.zeros(2, dtype=torch.int32) + r}, (1, "a")],
    }


def _values(d: Any) -> Any:
    if isinstance(d, torch.Tensor):
        return d.clone()
    if isinstance(d, dict):
        return {k: _values(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(_values(v) for v in d)
    return d


def transport_main() -> dict[str, Any]:
    """Run on DeviceMesh(pp=2, tp=2): every transport operation; report the results."""
    ctx = topo.current()
    rank, out = ctx.rank, {}
    for axis in ("tp", "pp"):
        for dim in (0, 1):
            for method in ("auto", "padded", "broadcast"):
                x = uneven_input(rank, dim)
                out[f"gatherv/{axis}/{dim}/{method}"] = topo.all_gatherv(
                    x, axis, dim=dim, method=method
                )
        group = ctx.group(axis)
        sizes = [r % 3 for r in group]
        x = uneven_input(rank, 1, torch.bfloat16)
        out[f"gatherv/{axis}/sizes"] = topo.all_gatherv(x, axis, dim=1, sizes=sizes)
        for op in ("sum", "max"):
            rs = [1, 3] if axis == "tp" else [0, 4]
            out[f"rs/{axis}/{op}"] = topo.reduce_scatterv(rs_input(rank, 4), axis, rs, dim=0, op=op)
        out[f"rs/{axis}/dim1"] = topo.reduce_scatterv(rs_input(rank, 4).t(), axis, [2, 2], dim=1)
    # broadcast_tensor_dict over tp (src 1) and over both axes (src 2)
    src_d = tensor_dict(rank)
    me = ctx.axis_index("tp")
    out["bcast/tp"] = _values(topo.broadcast_tensor_dict(src_d if me == 1 else None, "tp", src=1))
    me4 = ctx.axis_index(("pp", "tp"))
    got = topo.broadcast_tensor_dict(src_d if me4 == 2 else None, ("pp", "tp"), src=2)
    out["bcast/all"] = _values(got)
    # pipeline hand-off: pp 0 -> pp 1, plain and with the all-gather trick
    stage = ctx.axis_index("pp")
    for ag in (None, "tp"):
        if stage == 0:
            # every tp rank of a stage holds the same values (as in tensor parallelism)
            topo.send_tensor_dict(tensor_dict(10 + stage), "pp", dst=1, all_gather_axis=ag)
        else:
            out[f"p2p/{ag}"] = _values(topo.recv_tensor_dict("pp", src=0, all_gather_axis=ag))
    # objects point to point, both directions
    if stage == 0:
        topo.send_object({"from": rank, "data": list(range(rank + 5000))}, "pp", dst=1)
        out["obj"] = topo.recv_object("pp", src=1)
    else:
        out["obj"] = topo.recv_object("pp", src=0)
        topo.send_object(("back", rank), "pp", dst=0)
    # message queues: shared memory and sockets, writer index 1 of the four ranks
    for transport in ("auto", "socket"):
        msgs = [{"i": i, "pad": "x" * (i * 50_000)} for i in range(12)]  # some span 2+ slots
        with topo.MessageQueue(("pp", "tp"), writer=1, slot_bytes=64 * 1024, slots=4,
                               transport=transport) as mq:  # fmt: skip
            if me4 == 1:
                for m in msgs:
                    mq.enqueue(m)
                mq.enqueue_bytes(b"raw")
                out[f"mq/{transport}/kinds"] = (mq.shm_readers, mq.socket_readers)
            else:
                out[f"mq/{transport}"] = [mq.dequeue(timeout=WAIT) for _ in msgs]
                out[f"mq/{transport}/raw"] = mq.dequeue_bytes(timeout=WAIT)
            ctx.communicator(("pp", "tp"), "cpu").barrier()
    out["shm_after"] = sorted(f for f in os.listdir("/dev/shm") if f.startswith("topo_mq_"))
    return out


def errors_main() -> dict[str, str]:
    """Bad input on DeviceMesh(tp=2): each error's class and message, then a working call."""
    ctx = topo.current()
    me = ctx.axis_index("tp")
    errors: dict[str, str] = {}

    def catch(key: str, fn: Any) -> None:
        try:
            fn()
            errors[key] = "no error"
        except topo.TopoError as error:
            errors[key] = f"{type(error).__name__}: {error}"

    catch("rs_sum", lambda: topo.reduce_scatterv(torch.ones(5), "tp", [2, 2]))
    catch("rs_len", lambda: topo.reduce_scatterv(torch.ones(4), "tp", [4]))
    catch("gv_sizes", lambda: topo.all_gatherv(torch.ones(2), "tp", sizes=[2, 2, 2]))
    catch("gv_mine", lambda: topo.all_gatherv(torch.ones(2), "tp", sizes=[3, 3]))
    catch("gv_mismatch", lambda: topo.all_gatherv(torch.ones(2, 2 + me), "tp"))
    catch("td_scalar", lambda: topo.broadcast_tensor_dict({"a": {"b": object()}}, "tp"))
    catch("td_key", lambda: topo.broadcast_tensor_dict({1: torch.ones(1)}, "tp"))  # type: ignore[dict-item]
    catch("send_self", lambda: topo.send_object(1, "tp", dst=me))
    # after the errors the axis still works
    errors["after"] = str(topo.all_gatherv(torch.ones(me + 1), "tp").tolist())
    # a reader that never reads: the writer times out naming it
    with topo.MessageQueue("tp", writer=0, slots=2, slot_bytes=16, timeout=1.0) as mq:
        if me == 0:
            catch("mq_full", lambda: [mq.enqueue_bytes(b"x") for _ in range(5)])
        else:
            catch("mq_role", lambda: mq.enqueue(1))
        ctx.communicator(("tp",), "cpu").barrier()
    with topo.MessageQueue("tp", writer=0, timeout=1.0) as mq:
        if me == 1:
            catch("mq_empty", lambda: mq.dequeue(timeout=0.2))
        ctx.communicator(("tp",), "cpu").barrier()
    return errors


def mq_kill_main(victim: int) -> None:
    """A queue on DeviceMesh(tp=3); after one message, index ``victim`` kills itself with
    SIGKILL (the writer when 0); the survivors then wait to be ended by topo.spawn."""
    me = topo.axis_index("tp")
    mq = topo.MessageQueue("tp", writer=0, timeout=WAIT)
    if me == 0:
        mq.enqueue("hello")
    else:
        assert mq.dequeue(timeout=WAIT) == "hello"
    if me == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(WAIT)

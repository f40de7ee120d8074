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
            for method in ("auto", "padded", "broadcast", "p2p"):
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
    out["errors"] = errors_main()
    return out


def errors_main() -> dict[str, str]:
    """Bad input on the tp axis (size 2): each error's class and message, then a working
    call."""
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
    if me == 0:
        catch("send_bad", lambda: topo.send_tensor_dict({"x": {1, 2}}, "tp", dst=1))
    else:
        catch("send_bad", lambda: topo.recv_tensor_dict("tp", src=0))
    # a dtype the receiver's torch does not know (simulated by hiding float16 from it): the
    # receiver drains the bytes, raises, and the axis stays in step
    from topo.transport import _wire

    hidden = _wire._DTYPES.pop("float16") if me == 1 else None
    sent = {"h": torch.ones(3, dtype=torch.float16), "f": torch.ones(2)} if me == 0 else None
    catch("td_dtype", lambda: topo.broadcast_tensor_dict(sent, "tp"))
    if hidden is not None:
        _wire._DTYPES["float16"] = hidden
    again = topo.broadcast_tensor_dict({"x": torch.arange(3)} if me == 0 else None, "tp")
    errors["after_dtype"] = str(again["x"].tolist())
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


def mq_kill_main(victims: tuple[int, ...]) -> None:
    """A queue on DeviceMesh(tp=3); after one message, the indices in ``victims`` kill
    themselves with SIGKILL (0 is the writer); the survivors wait to be ended by topo.spawn."""
    me = topo.axis_index("tp")
    mq = topo.MessageQueue("tp", writer=0, timeout=WAIT)
    if me == 0:
        mq.enqueue("hello")
    else:
        assert mq.dequeue(timeout=WAIT) == "hello"
    if me in victims:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(WAIT)


# ------------------------------------------------------------------------- weight transfer


def weights() -> list[tuple[str, torch.Tensor]]:
    """Mixed shapes and dtypes: 0-d, empty, bool, bf16, complex, and tensors larger than the
    small test buckets (moved alone)."""
    g = torch.Generator().manual_seed(7)
    out: list[tuple[str, torch.Tensor]] = []
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8,
              torch.float64, torch.complex64]  # fmt: skip
    for i in range(24):
        shape = [(i % 5) + 1, (i * 7) % 11 + 1][: 1 + i % 2]
        t = (torch.randn(shape, generator=g) * 50).to(dtypes[i % len(dtypes)])
        out.append((f"layer{i}.w", t))
    out.append(("mask", torch.arange(10) % 3 == 0))
    out.append(("scale", torch.tensor(2.5)))
    out.append(("empty", torch.empty(0, 4)))
    out.append(("big", torch.randn(3000, generator=g)))  # 12 KB: beyond a 4 KiB bucket
    out.append(("strided", torch.arange(40.0).reshape(5, 8).t()))
    return out


def _collect(store: dict[str, torch.Tensor]) -> Any:
    def load(name: str, t: torch.Tensor) -> None:
        store[name] = t.clone()

    return load


def transfer_axis_main() -> dict[str, Any]:
    """On DeviceMesh(tp=3): index 0 sends weights() three ways; then bad handshakes."""
    me = topo.axis_index("tp")
    out: dict[str, Any] = {}
    modes = {"small": {"bucket_bytes": 4096, "num_buffers": 2}, "default": {},
             "unpacked": {"packed": False}, "one_buffer": {"bucket_bytes": 2048, "num_buffers": 1},
             "three": {"bucket_bytes": 1024, "num_buffers": 3}}  # fmt: skip
    for key, kw in modes.items():
        if me == 0:
            out[key] = topo.transfer.send_weights(weights(), "tp", **kw).calls
        else:
            got: dict[str, torch.Tensor] = {}
            expect = dict(weights())
            topo.transfer.receive_weights("tp", load=_collect(got), expect=expect)
            out[key] = got

    def attempt(key: str, fn: Any) -> None:
        try:
            fn()
            out[key] = "no error"
        except topo.TopoError as error:
            out[key] = f"{type(error).__name__}: {error}"

    good = dict(weights())
    bad_shape = dict(good, **{"layer3.w": torch.zeros(9, 9)})
    missing = dict(list(good.items())[:-1])
    cases = {
        "bad_shape": ({2: {"expect": bad_shape}}),
        "missing": ({1: {"expect": missing}}),
        "bucket": ({1: {"bucket_bytes": 123}}),
    }
    for key, per_rank in cases.items():
        if me == 0:
            attempt(key, lambda: topo.transfer.send_weights(weights(), "tp", bucket_bytes=4096))
        else:
            kw = per_rank.get(me, {})
            attempt(
                key, lambda kw=kw: topo.transfer.receive_weights("tp", load=lambda n, t: None, **kw)
            )
    if me == 0:
        attempt("bad_name", lambda: topo.transfer.send_weights([("a", 1)], "tp"))
    else:
        attempt("bad_name", lambda: topo.transfer.receive_weights("tp", load=lambda n, t: None))
    # nothing is left half-done: a good transfer still works
    if me == 0:
        topo.transfer.send_weights(weights(), "tp", bucket_bytes=4096)
    else:
        got = {}
        topo.transfer.receive_weights("tp", load=_collect(got))
        out["after"] = got
    return out


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    m.register_buffer("step", torch.tensor(seed))
    return m


def trainer_main(port: int) -> None:
    """The trainer job: bridge rank 0 of 5; sends its model packed, then unpacked."""
    m = model(0)
    with topo.transfer.bridge("127.0.0.1", port, rank=0, world_size=5, timeout=WAIT):
        topo.transfer.send_weights(m.state_dict().items(), "bridge", bucket_bytes=256)
        topo.transfer.send_weights(m.state_dict().items(), "bridge", packed=False)


def inference_main(port: int) -> list[dict[str, torch.Tensor]]:
    """Each rank of the inference mesh (dp x tp): joins the bridge with the seed's rank and
    loads the trainer's weights into its own nn.Module, twice."""
    ctx = topo.current()
    dp, tp = ctx.coords["dp"], ctx.coords["tp"]
    r = topo.transfer.worker_rank(dp, tp, world_size_per_dp=ctx.mesh.size // ctx.mesh.shape["dp"])
    m = model(100 + ctx.rank)
    state = m.state_dict()
    out = []
    with topo.transfer.bridge("127.0.0.1", port, rank=r, world_size=5, timeout=WAIT) as b:
        assert b.rank == r
        for _ in range(2):

            def load(name: str, t: torch.Tensor) -> None:
                with torch.no_grad():
                    state[name].copy_(t)

            topo.transfer.receive_weights("bridge", load=load, expect=state)
            out.append({k: v.clone() for k, v in m.state_dict().items()})
            for p in m.parameters():
                torch.nn.init.zeros_(p)
    # the inference mesh itself still works beside the bridge
    out.append({"sum": topo.all_reduce(torch.ones(1), "tp")})
    return out


def prompt_failures() -> dict[str, Any]:
    """On DeviceMesh(tp=2): calls that fail on one rank before moving data; each rank reports
    what it raised and how long it took (the others must not wait out the timeout)."""
    ctx = topo.current()
    me = ctx.axis_index("tp")
    cyclic: dict[str, Any] = {"x": torch.ones(1)}
    cyclic["self"] = cyclic
    sparse = torch.eye(2).to_sparse()
    scenarios: dict[str, Any] = {
        "tensor dict sparse": lambda: topo.broadcast_tensor_dict(
            {"s": sparse} if me == 0 else None, "tp"
        ),
        "tensor dict cycle": lambda: topo.broadcast_tensor_dict(cyclic if me == 0 else None, "tp"),
        "send_weights sparse": lambda: (
            topo.transfer.send_weights([("s", sparse)], "tp") if me == 0
            else topo.transfer.receive_weights("tp", load=lambda n, t: None)
        ),
        "send_tensor_dict bad axis": lambda: (
            topo.send_tensor_dict({"x": torch.ones(2)}, "tp", dst=1, all_gather_axis="zz")
            if me == 0 else topo.recv_tensor_dict("tp", src=0)
        ),
        "receive_weights load None": lambda: (
            topo.transfer.send_weights([("w", torch.ones(2))], "tp") if me == 0
            else topo.transfer.receive_weights("tp", load=None)  # type: ignore[arg-type]
        ),
        # index 1 calls send_weights too (src is 0): it must not be left alone
        "send_weights on a receiver": lambda: topo.transfer.send_weights(
            [("w", torch.ones(2))], "tp"
        ),
        "receive_weights on the sender": lambda: topo.transfer.receive_weights(
            "tp", load=lambda n, t: None
        ),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for name, call in scenarios.items():
        start = time.perf_counter()
        try:
            call()
            out[name] = ("no error", time.perf_counter() - start)
        except Exception as error:
            out[name] = (f"{type(error).__name__}: {error}", time.perf_counter() - start)
        ctx.communicator(("tp",), "cpu").barrier()  # in step for the next one
    return out

"""Weight transfer: one rank broadcasts named tensors to the other ranks of an axis.

The sender (index ``src``) calls :func:`send_weights`, every other rank :func:`receive_weights`.
First one metadata handshake: the sender broadcasts the names, dtypes and shapes (JSON), every
receiver checks them against what it expects, and all ranks exchange their verdicts, so a
mismatch is an error on every rank, naming the first difference, before any tensor byte moves.

Packed mode groups tensors into buckets of ``bucket_bytes`` and broadcasts one bucket per
call; while bucket k is on the wire the sender packs bucket k+1 into the next of
``num_buffers`` buffers (a thread on CPU, a side CUDA stream on GPU). A tensor of
``bucket_bytes`` or more is broadcast directly from its own memory (no packing copy), so a
single huge tensor costs what a plain broadcast costs. Receivers get views into the received
bucket: ``load(name, tensor)`` must copy what it keeps (e.g. ``param.copy_(tensor)``); the
view is not valid after ``load`` returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from topo._checks import as_bool, as_int
from topo.active import find_context
from topo.collectives._common import check_index
from topo.communicators.base import Communicator, plain
from topo.context import MeshContext
from topo.errors import CollectiveMismatchError, TopoError, TopoTypeError, TopoValueError
from topo.mesh import Axis
from topo.transport import _wire

__all__ = ["TransferSummary", "receive_weights", "send_weights"]

#: Default bucket size (1 GiB), as the seed engine.
DEFAULT_BUCKET_BYTES = 1 << 30
_VERDICT_BYTES = 2048

Expected = Mapping[str, "torch.Tensor | tuple[tuple[int, ...], torch.dtype]"]


@dataclass(frozen=True)
class TransferSummary:
    """What one transfer moved: tensors, bytes, broadcast calls and wall time.

    Example::

        s = topo.transfer.send_weights(model.named_parameters(), axis="bridge")
        print(s.tensors, s.nbytes, s.calls, s.seconds)
    """

    tensors: int
    nbytes: int
    calls: int
    seconds: float


@dataclass(frozen=True)
class _Step:
    """One broadcast: a packed bucket (``items`` = (tensor index, offset)) or one tensor."""

    nbytes: int
    items: tuple[tuple[int, int], ...]
    direct: int | None = None


def _plan(sizes: list[int], packed: bool, bucket_bytes: int) -> list[_Step]:
    if not packed:
        return [_Step(size, (), i) for i, size in enumerate(sizes)]
    steps: list[_Step] = []
    items: list[tuple[int, int]] = []
    at = 0
    for i, size in enumerate(sizes):
        if size >= bucket_bytes:  # alone, after the open bucket (load order = send order)
            if items:
                steps.append(_Step(at, tuple(items)))
                items, at = [], 0
            steps.append(_Step(size, (), i))
            continue
        if at + size > bucket_bytes and items:
            steps.append(_Step(at, tuple(items)))
            items, at = [], 0
        items.append((i, at))
        at = _wire.align(at + size)
    if items:
        steps.append(_Step(at, tuple(items)))
    return steps


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    count = 1
    for s in shape:
        count *= s
    return count * torch.empty(0, dtype=dtype).element_size()


def _resolve(axis: Axis, src: object, operation: str) -> tuple[MeshContext, Communicator, int]:
    ctx, names, n = find_context(axis, operation)
    root = check_index(src, n, operation, "src", axis)
    if n == 1:
        raise TopoValueError(
            f"topo.transfer.{operation} requires an axis with a sender and receivers, but axis "
            f"{axis!r} has size 1"
        )
    return ctx, ctx.communicator(names, "cpu"), root


def _verdicts(comm: Communicator, mine: str, operation: str) -> None:
    """Exchange every rank's verdict on the metadata; raise on every rank if any rejected."""
    raw = mine.encode()[: _VERDICT_BYTES - 1]
    row = torch.zeros(_VERDICT_BYTES, dtype=torch.uint8)
    if raw:
        row[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    table = comm.all_gather(row)
    for i in range(comm.size):
        text = table[i].numpy().tobytes().rstrip(b"\0").decode(errors="replace")
        if text:
            raise CollectiveMismatchError(
                f"topo.transfer.{operation}: index {i} (rank {comm.ranks[i]}) rejected the "
                f"transfer before any weights moved: {text}"
            )


def send_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    axis: Axis,
    src: int = 0,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    packed: bool = True,
    num_buffers: int = 2,
) -> TransferSummary:
    """Broadcast ``(name, tensor)`` pairs from this rank (index ``src`` of ``axis``) to the
    other ranks of the axis, which call :func:`receive_weights`.

    All tensors live on one device kind (CPU → gloo, CUDA → NCCL). ``packed`` groups them
    into buckets of ``bucket_bytes`` (default 1 GiB) broadcast with ``num_buffers`` (2–3)
    buffers so packing overlaps the wire; a tensor of ``bucket_bytes`` or more moves alone,
    without a copy. ``packed=False`` sends one broadcast per tensor.

    Example::

        with bridge("10.0.0.1", 29600, rank=0, world_size=5):
            topo.transfer.send_weights(model.named_parameters(), axis="bridge")
    """
    ctx, comm, root = _resolve(axis, src, "send_weights")
    if comm.index != root:
        wrong = (
            f"topo.transfer.send_weights must be called by index src={root} of axis {axis!r}, "
            f"but index {comm.index} (rank {comm.ranks[comm.index]}) called it; the others call "
            f"receive_weights"
        )
        # Take part as a receiver would, so the others learn of it at once instead of waiting.
        meta = _wire.loads(_wire.broadcast_bytes(comm, None, root), "send_weights")
        if isinstance(meta, dict) and "error" not in meta:
            with contextlib.suppress(CollectiveMismatchError):
                _verdicts(comm, wrong, "send_weights")
        raise TopoValueError(wrong)
    try:
        pairs, meta = _describe(named_tensors, bucket_bytes, packed, num_buffers)
    except TopoError as error:
        _wire.broadcast_bytes(comm, _wire.dumps({"error": str(error)}), root)
        raise
    _wire.broadcast_bytes(comm, _wire.dumps(meta), root)
    _verdicts(comm, "", "send_weights")
    start = time.perf_counter()
    tensors = [t for _, t in pairs]
    steps = _plan([t.numel() * t.element_size() for t in tensors], meta["packed"], bucket_bytes)
    device = ctx.communicator(comm_names(ctx, axis), meta["device"])
    if meta["device"] == "cuda":
        _send_cuda(device, tensors, steps, root, num_buffers)
    else:
        _send_cpu(device, tensors, steps, root, num_buffers)
    seconds = time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return TransferSummary(len(tensors), nbytes, len(steps), seconds)


def comm_names(ctx: MeshContext, axis: Axis) -> tuple[str, ...]:
    return ctx.resolve(axis)[0]


def _describe(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: object,
    packed: object,
    num_buffers: object,
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    size = as_int(bucket_bytes, "topo.transfer.send_weights bucket_bytes", minimum=1)
    buffers = as_int(num_buffers, "topo.transfer.send_weights num_buffers", minimum=1, maximum=8)
    pairs: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    kinds: set[str] = set()
    for pair in named_tensors:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TopoTypeError(
                f"topo.transfer.send_weights named_tensors requires (name: str, tensor) pairs "
                f"like model.named_parameters(), but got {pair!r:.80}"
            )
        name, t = pair
        if not isinstance(t, torch.Tensor):
            raise TopoTypeError(
                f"topo.transfer.send_weights requires a tensor for {name!r}, but got "
                f"{type(t).__name__}"
            )
        if t.layout is not torch.strided or t.is_nested or t.is_quantized:
            raise TopoTypeError(
                f"topo.transfer.send_weights requires dense tensors, but {name!r} is a "
                f"{t.layout} {'nested ' if t.is_nested else ''}"
                f"{'quantized ' if t.is_quantized else ''}tensor; send t.to_dense() (or its "
                f"parts)"
            )
        if name in seen:
            raise TopoValueError(
                f"topo.transfer.send_weights requires unique names, but {name!r} appears twice"
            )
        seen.add(name)
        kinds.add(t.device.type)
        pairs.append((name, t.detach()))
    if not kinds <= {"cpu", "cuda"} or len(kinds) > 1:
        raise TopoValueError(
            f"topo.transfer.send_weights requires every tensor on one device kind, 'cpu' (gloo) "
            f"or 'cuda' (NCCL), but got {sorted(kinds)}; move them with .cpu() or .cuda()"
        )
    meta = {
        "names": [name for name, _ in pairs],
        "dtypes": [_wire.dtype_name(t.dtype) for _, t in pairs],
        "shapes": [list(t.shape) for _, t in pairs],
        "device": kinds.pop() if kinds else "cpu",
        "packed": as_bool(packed, "topo.transfer.send_weights packed"),
        "bucket_bytes": size,
        "num_buffers": buffers,
    }
    return pairs, meta


def _pack(buffer: torch.Tensor, tensors: list[torch.Tensor], step: _Step) -> torch.Tensor:
    out = buffer[: step.nbytes]
    _wire.pack_into(out, [tensors[i] for i, _ in step.items], [at for _, at in step.items])
    return out


def _send_cpu(
    comm: Communicator, tensors: list[torch.Tensor], steps: list[_Step], root: int, buffers: int
) -> None:
    """Broadcast bucket k while a thread packs bucket k+1 into the next buffer."""
    longest = max((s.nbytes for s in steps if s.direct is None), default=0)
    pool = [torch.empty(longest, dtype=torch.uint8) for _ in range(min(buffers, len(steps)))]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="topo-pack") as packer:

        def submit(k: int) -> Future[torch.Tensor] | None:
            if k >= len(steps) or steps[k].direct is not None:
                return None
            return packer.submit(_pack, pool[k % len(pool)], tensors, steps[k])

        ahead = len(pool) > 1  # with one buffer, packing k+1 must wait for broadcast k
        pending = submit(0)
        for k, step in enumerate(steps):
            current = pending
            if ahead:
                pending = submit(k + 1)  # overlaps the broadcast below (a different buffer)
            if step.direct is not None:
                comm.broadcast(plain(tensors[step.direct]), root)
            else:
                assert current is not None
                comm.broadcast(current.result(), root)
            if not ahead:
                pending = submit(k + 1)


def _send_cuda(
    comm: Communicator, tensors: list[torch.Tensor], steps: list[_Step], root: int, buffers: int
) -> None:
    """Pack on a side stream, broadcast on the current one; events order buffer reuse."""
    device = next(t.device for t in tensors)
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    longest = max((s.nbytes for s in steps if s.direct is None), default=0)
    count = min(buffers, len(steps)) or 1
    pool = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(count)]
    free: list[Any] = [None] * count  # event: the broadcast that last read buffer j finished
    side.wait_stream(main)  # the tensors' producers
    for k, step in enumerate(steps):
        if step.direct is not None:
            comm.broadcast(plain(tensors[step.direct]), root)
            continue
        j = k % count
        with torch.cuda.stream(side):
            if free[j] is not None:
                side.wait_event(free[j])
            bucket = _pack(pool[j], tensors, step)
            packed = torch.cuda.Event()  # type: ignore[no-untyped-call]
            packed.record(side)
        main.wait_event(packed)
        comm.broadcast(bucket, root)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(main)
        free[j] = done
    for t in tensors:
        t.record_stream(side)


def receive_weights(
    axis: Axis,
    src: int = 0,
    *,
    load: Callable[[str, torch.Tensor], object],
    expect: Expected | None = None,
    bucket_bytes: int | None = None,
    packed: bool | None = None,
) -> TransferSummary:
    """Receive the tensors index ``src`` of ``axis`` sends with :func:`send_weights`, calling
    ``load(name, tensor)`` for each, in the sender's order.

    ``expect`` (names → tensors, or → ``(shape, dtype)``; e.g. ``dict(model.named_parameters())``)
    checks the sender's names, count, shapes and dtypes before anything moves; ``bucket_bytes``
    and ``packed``, when given, must match the sender's. Any mismatch raises
    :class:`~topo.CollectiveMismatchError` on every rank naming the first difference. The
    tensor passed to ``load`` is a view into a reused buffer: copy what you keep.

    Example::

        params = dict(model.named_parameters())
        with torch.no_grad():
            topo.transfer.receive_weights("bridge", load=lambda n, t: params[n].copy_(t),
                                          expect=params)
    """
    ctx, comm, root = _resolve(axis, src, "receive_weights")
    if comm.index == root:
        wrong = (
            f"topo.transfer.receive_weights must not be called by the sender (index {root} of "
            f"axis {axis!r}); it calls send_weights"
        )
        _wire.broadcast_bytes(comm, _wire.dumps({"error": wrong}), root)  # the others stop too
        raise TopoValueError(wrong)
    meta = _wire.loads(_wire.broadcast_bytes(comm, None, root), "receive_weights")
    if not isinstance(meta, dict) or "error" in meta:
        reason = meta.get("error") if isinstance(meta, dict) else meta
        raise TopoValueError(
            f"topo.transfer.receive_weights: the sender (index {root}) could not start the "
            f"transfer: {reason}"
        )
    try:
        if not callable(load):
            raise TopoTypeError(
                f"topo.transfer.receive_weights load requires a callable load(name, tensor), "
                f"but got {type(load).__name__}"
            )
        dtypes = [_wire.dtype_from_name(d, "topo.transfer.receive_weights") for d in meta["dtypes"]]
        verdict = _check(meta, dtypes, expect, bucket_bytes, packed)
    except TopoError as error:
        verdict = str(error)  # every rank raises it, before any weight moves
    _verdicts(comm, verdict, "receive_weights")
    start = time.perf_counter()
    names, shapes = meta["names"], meta["shapes"]
    sizes = [_nbytes(d, s) for d, s in zip(dtypes, shapes, strict=True)]
    steps = _plan(sizes, meta["packed"], meta["bucket_bytes"])
    kind = meta["device"]
    device = torch.device("cpu") if kind == "cpu" else ctx.device
    wire = ctx.communicator(comm_names(ctx, axis), kind)
    for step in steps:
        if step.direct is not None:
            i = step.direct
            like = torch.empty(shapes[i], dtype=dtypes[i], device=device)
            load(names[i], wire.broadcast(like, root))
            continue
        bucket = wire.broadcast(torch.empty(step.nbytes, dtype=torch.uint8, device=device), root)
        for i, at in step.items:
            load(names[i], _wire.unpack(bucket, at, dtypes[i], shapes[i]))
    seconds = time.perf_counter() - start
    return TransferSummary(len(names), sum(sizes), len(steps), seconds)


def _check(
    meta: dict[str, Any],
    dtypes: list[torch.dtype],
    expect: Expected | None,
    bucket_bytes: int | None,
    packed: bool | None,
) -> str:
    """The first difference between what was announced and what this rank expects, or ''."""
    if bucket_bytes is not None and bucket_bytes != meta["bucket_bytes"]:
        return f"bucket_bytes differs: the sender uses {meta['bucket_bytes']}, this rank {bucket_bytes}"
    if packed is not None and bool(packed) != meta["packed"]:
        return f"packed differs: the sender uses {meta['packed']}, this rank {packed}"
    if expect is None:
        return ""
    names, shapes = meta["names"], meta["shapes"]
    wanted = list(expect.items())
    for i, ((name, spec), sent) in enumerate(zip(wanted, names, strict=False)):
        if name != sent:
            return f"tensor #{i} is named {sent!r} by the sender but {name!r} here"
        shape, dtype = (tuple(spec.shape), spec.dtype) if isinstance(spec, torch.Tensor) else spec
        if list(shape) != shapes[i] or dtype != dtypes[i]:
            return (
                f"tensor {name!r} is {dtypes[i]} {tuple(shapes[i])} from the sender but "
                f"{dtype} {tuple(shape)} here"
            )
    if len(wanted) != len(names):
        extra = names[len(wanted)] if len(names) > len(wanted) else wanted[len(names)][0]
        return (
            f"count differs: the sender sends {len(names)} tensors, this rank expects "
            f"{len(wanted)} (first unmatched: {extra!r})"
        )
    return ""

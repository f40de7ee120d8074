"""A flight recorder per communicator: how many calls it has made, and the last few (operation,
dtype and shape of the input).

Each call of a communicator (gloo, NCCL) records its operation before it runs: a counter and
a slot of a small ring holding the operation and its input's shape and dtype, about 0.2 µs
(the shape and dtype are formatted only when a report needs them). Nothing is communicated. When a collective fails, the
roll call (``topo.communicators.rollcall``) publishes every communicator's record of the
failing rank and reads its peers', so the error can say which call each rank is in — "rank 3
is in all_gather #58 on axis 'tp' while ranks 0-2 are in all_reduce #58" — or that a rank
never reached it. torch's NCCL flight recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE``) is the
model; this one keeps counts, names, shapes and dtypes only (no timings, no stacks).

Example::

    recorder = FlightRecorder()
    recorder.record("all_reduce", torch.Size([4]), torch.float32)
    recorder.calls, recorder.last()   # (1, ['all_reduce(float32[4])'])
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEPTH", "FlightRecorder"]

#: How many of the last calls each recorder keeps (a power of two).
DEPTH = 8
_MASK = DEPTH - 1


class FlightRecorder:
    """The calls of one communicator: a count (the sequence number of the latest call) and
    the last :data:`DEPTH` (operation, input shape and dtype).

    Example::

        comm.flight.record("all_gather")
    """

    __slots__ = ("_ring", "calls")

    def __init__(self) -> None:
        self.calls = 0
        self._ring: list[tuple[str, torch.Size | None, torch.dtype | None] | None]
        self._ring = [None] * DEPTH

    def record(
        self, operation: str, shape: torch.Size | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Count a call of ``operation`` on an input of ``shape`` and ``dtype`` (made before
        the call runs; the caller passes what it has read from its input anyway).

        Example::

            self.flight.record("all_reduce", x.shape, x.dtype)
        """
        n = self.calls + 1
        self.calls = n
        self._ring[n & _MASK] = (operation, shape, dtype)

    def last(self) -> list[str]:
        """The last calls, oldest first, as ``operation(dtype[shape])``.

        Example::

            recorder.last()   # ['all_reduce(float32[4])', 'all_gather(bfloat16[2, 8])']
        """
        n = self.calls
        first = max(1, n - DEPTH + 1)
        return [_describe(self._ring[i & (DEPTH - 1)]) for i in range(first, n + 1)]

    def summary(self) -> dict[str, Any]:
        """JSON-able: ``{"calls": n, "last": [...]}``.

        Example::

            json.dumps(recorder.summary())
        """
        return {"calls": self.calls, "last": self.last()}


def _describe(entry: tuple[str, torch.Size | None, torch.dtype | None] | None) -> str:
    if entry is None:
        return "?"
    operation, shape, dtype = entry
    if shape is None or dtype is None:
        return operation
    return f"{operation}({str(dtype).removeprefix('torch.')}{list(shape)})"

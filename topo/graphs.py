"""CUDA-graph capture of topo collectives.

NCCL collectives run on torch's current stream, so a ``torch.cuda.CUDAGraph`` captures them
like any kernel. Communicators must exist before capture (creating one talks to the store and
initializes NCCL, which cannot happen inside a capture): :func:`graph_capture` creates them
for the axes you name, then captures on a side stream that first waits on the current one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from topo.mesh import Axis

__all__ = ["graph_capture"]


@contextmanager
def graph_capture(
    axes: Sequence[Axis] = (),
    graph: torch.cuda.CUDAGraph | None = None,
    *,
    stream: torch.cuda.Stream | None = None,
    pool: Any = None,
) -> Iterator[torch.cuda.CUDAGraph]:
    """Capture the collectives (and kernels) of the block into a CUDA graph.

    ``axes`` lists the axes (names or tuples) whose NCCL communicators the block uses; they
    are created before capture starts. Capture runs under the context's CUDA device. The capture runs on ``stream`` (default: a new side
    stream that waits on the current one, as vLLM does). Yields the graph; call
    ``graph.replay()`` afterwards.

    Example::

        x = torch.ones(1024, device="cuda")
        with topo.graph_capture(axes=["tp"]) as graph:
            y = topo.all_reduce(x, axis="tp")
        x.fill_(2.0)
        graph.replay()       # y now holds the sum of every rank's 2.0
    """
    from topo.active import current, find_context

    if not torch.cuda.is_available():
        from topo.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "topo.graph_capture requires a CUDA GPU, but torch sees none "
            "(torch.cuda.is_available() is False)"
        )
    device = current().device
    for axis in axes:
        ctx, names, n = find_context(axis, "graph_capture")
        if n > 1:
            ctx.communicator(names, "cuda")
            device = ctx.device
    graph = torch.cuda.CUDAGraph() if graph is None else graph
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device) if stream is None else stream  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.graph(graph, pool=pool, stream=side):
            yield graph
        torch.cuda.current_stream(device).wait_stream(side)

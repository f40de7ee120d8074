"""Collectives by axis name: free functions, out-of-place, ``src``/``dst`` are axis indices.

Each resolves ``axis`` in the innermost active mesh context that has it, picks the
communicator for the tensor's device (gloo for CPU, NCCL for CUDA), validates its arguments
and returns a new tensor.
"""

from topo.collectives.gathers import all_gather, all_to_all, gather
from topo.collectives.objects import all_gather_object, broadcast_object
from topo.collectives.one_to_all import broadcast, scatter
from topo.collectives.p2p import ppermute, recv, send, shift
from topo.collectives.reductions import all_reduce, reduce_scatter
from topo.collectives.sync import axis_index, axis_size, barrier

__all__ = [
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "axis_index",
    "axis_size",
    "barrier",
    "broadcast",
    "broadcast_object",
    "gather",
    "ppermute",
    "recv",
    "reduce_scatter",
    "scatter",
    "send",
    "shift",
]

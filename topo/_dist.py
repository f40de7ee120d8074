"""The ``torch.distributed`` building blocks topo uses, imported with their type stubs.

They are the same objects ``torch.distributed`` exports (it re-exports them from
``torch._C._distributed_c10d`` without declaring them for type checkers).
"""

from torch._C._distributed_c10d import (
    AllreduceOptions,
    AllToAllOptions,
    BarrierOptions,
    BroadcastOptions,
    GatherOptions,
    PrefixStore,
    ProcessGroupGloo,
    ReduceOp,
    ScatterOptions,
    Store,
    TCPStore,
    Work,
)

__all__ = [
    "AllToAllOptions",
    "AllreduceOptions",
    "BarrierOptions",
    "BroadcastOptions",
    "GatherOptions",
    "PrefixStore",
    "ProcessGroupGloo",
    "ReduceOp",
    "ScatterOptions",
    "Store",
    "TCPStore",
    "Work",
]

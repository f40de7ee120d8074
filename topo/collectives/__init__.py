"""Collectives by axis name: free functions, out-of-place, ``src``/``dst`` are axis indices.

Each resolves ``axis`` in the innermost active mesh context that has it, picks the
communicator for the tensor's device (gloo for CPU, NCCL for CUDA), validates its arguments
and returns a new tensor. The public names are those of the modules below.

A module is imported on the first use of one of its names, so a program's start pays only for
the collectives it calls (``topo.all_reduce`` loads ``reductions``, not the uneven
collectives or the object codec).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers
    from topo.collectives.gathers import *  # noqa: F403
    from topo.collectives.objects import *  # noqa: F403
    from topo.collectives.one_to_all import *  # noqa: F403
    from topo.collectives.p2p import *  # noqa: F403
    from topo.collectives.reductions import *  # noqa: F403
    from topo.collectives.sync import *  # noqa: F403
    from topo.collectives.uneven import *  # noqa: F403

#: Each public name → the module of this package that defines it (tests/test_public_api.py
#: checks the table against every module's ``__all__``), in that module's order.
_MODULE_OF = {
    "all_gather": "gathers",
    "all_to_all": "gathers",
    "gather": "gathers",
    "all_gather_object": "objects",
    "broadcast_object": "objects",
    "broadcast": "one_to_all",
    "scatter": "one_to_all",
    "ppermute": "p2p",
    "recv": "p2p",
    "send": "p2p",
    "shift": "p2p",
    "all_reduce": "reductions",
    "reduce_scatter": "reductions",
    "axis_index": "sync",
    "axis_size": "sync",
    "barrier": "sync",
    "all_gatherv": "uneven",
    "all_to_allv": "uneven",
    "reduce_scatterv": "uneven",
}

# A literal list, so that type checkers read the names (and types) that ``topo.all_reduce`` and
# the others have; the table above is the one tests/test_public_api.py checks it against.
__all__ = [  # noqa: F405 (defined by the star imports above, for type checkers)
    "all_gather",
    "all_gather_object",
    "all_gatherv",
    "all_reduce",
    "all_to_all",
    "all_to_allv",
    "axis_index",
    "axis_size",
    "barrier",
    "broadcast",
    "broadcast_object",
    "gather",
    "ppermute",
    "recv",
    "reduce_scatter",
    "reduce_scatterv",
    "scatter",
    "send",
    "shift",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'topo.collectives' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"topo.collectives.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

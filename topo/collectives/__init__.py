"""Collectives by axis name: free functions, out-of-place, ``src``/``dst`` are axis indices.

Each resolves ``axis`` in the innermost active mesh context that has it, picks the
communicator for the tensor's device (gloo for CPU, NCCL for CUDA), validates its arguments
and returns a new tensor. The public names are those of the modules below.
"""

from topo.collectives import gathers, objects, one_to_all, p2p, reductions, sync, uneven
from topo.collectives.gathers import *  # noqa: F403
from topo.collectives.objects import *  # noqa: F403
from topo.collectives.one_to_all import *  # noqa: F403
from topo.collectives.p2p import *  # noqa: F403
from topo.collectives.reductions import *  # noqa: F403
from topo.collectives.sync import *  # noqa: F403
from topo.collectives.uneven import *  # noqa: F403

__all__: list[str] = []
__all__ += gathers.__all__
__all__ += objects.__all__
__all__ += one_to_all.__all__
__all__ += p2p.__all__
__all__ += reductions.__all__
__all__ += sync.__all__
__all__ += uneven.__all__

"""Communicators: the protocol (``base``), the backend table (``registry``) and the backends
(``gloo``, ``nccl``, ``threads``). ``topo.communicators.register`` adds a backend.

Example::

    import topo.communicators

    topo.communicators.register("mpi", make_mpi, device_type="cpu")
"""

from topo.communicators.registry import *  # noqa: F403
from topo.communicators.registry import __all__ as __all__

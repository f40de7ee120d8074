"""topo: device-mesh topology for distributed deep learning.

Declare an immutable :class:`DeviceMesh`, compute any rank's groups and neighbours with pure
functions, and turn the spec into live communicators with ``mesh.activate()``; collectives are
free functions that name an axis.

Example::

    import topo

    mesh = topo.DeviceMesh(dp=2, pp=2, tp=2)
    mesh.group("tp", 5)                        # (4, 5)
    with mesh.activate():
        y = topo.all_reduce(x, axis="tp")

``import topo`` is light: the rank math needs no torch, and the runtime (which imports torch)
loads on first use of one of its names.

The public names are the ``__all__`` of the modules below (each name is written once, in the
module that defines it); ``topo.__all__``, attribute lookup and ``dir(topo)`` derive from them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from topo.mesh import *  # noqa: F403  (pure rank math: loaded eagerly)
from topo.placement import *  # noqa: F403  (pure, as topo.mesh)

if TYPE_CHECKING:  # the same modules as _LAZY_MODULES, for type checkers
    from topo.active import *  # noqa: F403
    from topo.collectives import *  # noqa: F403
    from topo.context import *  # noqa: F403
    from topo.coordinator import *  # noqa: F403
    from topo.errors import *  # noqa: F403
    from topo.graphs import *  # noqa: F403
    from topo.interop import *  # noqa: F403
    from topo.launch import *  # noqa: F403
    from topo.partition_spec import *  # noqa: F403
    from topo.rng import *  # noqa: F403
    from topo.simulation import *  # noqa: F403
    from topo.spmd import *  # noqa: F403
    from topo.transport import *  # noqa: F403
    from topo.world import *  # noqa: F403

__version__ = "0.1.0"

#: The modules whose ``__all__`` topo re-exports besides the eager ones. A lookup imports them
#: in this order until one defines the name: those that need no torch first, so that
#: ``topo.World`` or ``topo.TopoError`` never import it; then what every program's start needs
#: (``topo.all_reduce`` imports neither the launcher nor the simulator).
_LAZY_MODULES = (
    "topo.errors",
    "topo.world",
    "topo.context",
    "topo.active",
    "topo.coordinator",
    "topo.collectives",
    "topo.launch",
    "topo.simulation",
    "topo.rng",
    "topo.partition_spec",
    "topo.spmd",
    "topo.graphs",
    "topo.interop",
    "topo.transport",
)
_EAGER_MODULES = ("topo.mesh", "topo.placement")
#: Subpackages and submodules reached as attributes, their names not re-exported
#: (``topo.transfer.send_weights``, ``topo.autograd.copy_to``): loaded on first access.
_SUBMODULES = ("autograd", "transfer")


def _public_names() -> dict[str, str]:
    """Every public name → the module that defines it (imports the lazy modules)."""
    found: dict[str, str] = {}
    for module in (*_EAGER_MODULES, *_LAZY_MODULES):
        for name in importlib.import_module(module).__all__:
            found.setdefault(name, module)
    return found


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = sorted(_public_names())
    elif name in _SUBMODULES:
        value = importlib.import_module(f"topo.{name}")
    else:
        for module in _LAZY_MODULES:
            loaded = importlib.import_module(module)
            if name in loaded.__all__:
                value = getattr(loaded, name)
                break
        else:
            raise AttributeError(f"module 'topo' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_public_names()) | set(_SUBMODULES))

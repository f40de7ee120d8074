"""``topo.ray``: Ray as a launcher — one Ray actor per rank of a mesh.

``topo.ray.spawn(fn, mesh)`` runs a function once on every rank, as :func:`topo.spawn` does
with local processes; :class:`MeshActors` keeps the rank actors and their activation open
across calls (a trainer, an inference engine). The ranks land on Ray nodes by the mesh's node
placement (:func:`ray_plan`: one placement-group bundle per node of the plan,
``STRICT_SPREAD``). Ray itself is optional and imported on first use: without it, that use
raises :class:`topo.BackendUnavailableError` (``pip install 'topo[ray]'``). These names stay
in this subpackage (``topo.ray.spawn``), not at the top level.

Example::

    import ray
    import topo.ray

    ray.init()
    topo.ray.spawn(work, topo.DeviceMesh(dp=2, tp=2))
"""

from topo.ray import actors as _actors
from topo.ray import devices as _devices
from topo.ray import placement as _placement
from topo.ray import spawn as _spawn
from topo.ray.actors import *  # noqa: F403
from topo.ray.devices import *  # noqa: F403
from topo.ray.placement import *  # noqa: F403
from topo.ray.rank import rank_state
from topo.ray.spawn import *  # noqa: F403

__all__: list[str] = ["rank_state"]
__all__ += _actors.__all__
__all__ += _devices.__all__
__all__ += _placement.__all__
__all__ += _spawn.__all__

"""Where a mesh's ranks go on a Ray cluster: the placement group built from the mesh's node
placement (:meth:`topo.DeviceMesh.placement`).

One bundle per node of the plan, holding that node's ranks' resources, and the bundles
``STRICT_SPREAD`` across Ray nodes (one node: one bundle, ``STRICT_PACK``). Each rank's actor
is scheduled into its node's bundle, so the ranks the plan puts on one node share a Ray node
(an axis the plan keeps inside a node, tp say, never spans two), and two nodes of the plan are
never the same Ray node, so ``local_rank`` / ``local_world_size`` tell the truth. The plan is
pure (:func:`ray_plan`, no Ray); :func:`place` asks Ray for the group.

Example::

    >>> plan = ray_plan(DeviceMesh(dp=2, tp=2), ranks_per_node=2)
    >>> plan.bundles, plan.strategy, plan.bundle_of_rank
    (({'CPU': 2.0}, {'CPU': 2.0}), 'STRICT_SPREAD', (0, 0, 1, 1))
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Mapping
from typing import Any

import attrs

from topo._checks import as_int
from topo.errors import RendezvousTimeout, TopoTypeError, TopoValueError
from topo.mesh import DeviceMesh
from topo.placement import Placement
from topo.ray._require import require_ray

__all__ = ["RayPlan", "place", "ray_plan"]

#: Resources a rank takes when ``resources_per_rank`` is not given.
DEFAULT_RESOURCES = {"CPU": 1.0}


@attrs.frozen
class RayPlan:
    """The Ray placement of a mesh: one bundle per node of the plan, and each rank's bundle.

    ``bundles[i]`` holds the resources of node ``i``'s ranks (the sum of their
    ``rank_resources``); ``strategy`` is ``"STRICT_SPREAD"`` (every bundle on its own Ray
    node) or, for a single node, ``"STRICT_PACK"``. ``local_ranks[r]`` is rank ``r``'s index
    on its node.

    Example::

        >>> plan = ray_plan(DeviceMesh(dp=2, tp=2), ranks_per_node=2, num_gpus=1)
        >>> plan.bundles[1], plan.local_ranks
        ({'CPU': 2.0, 'GPU': 2.0}, (0, 1, 0, 1))
    """

    placement: Placement
    rank_resources: dict[str, float]
    bundles: tuple[dict[str, float], ...]
    strategy: str
    bundle_of_rank: tuple[int, ...]
    local_ranks: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        """How many Ray nodes the mesh spans (one bundle each).

        Example::

            >>> ray_plan(DeviceMesh(dp=2, tp=2), ranks_per_node=2).num_nodes
            2
        """
        return len(self.bundles)

    @property
    def local_world_size(self) -> int:
        """Ranks per node (the whole mesh when it fits on one node).

        Example::

            >>> ray_plan(DeviceMesh(dp=2, tp=2)).local_world_size
            4
        """
        return min(self.placement.ranks_per_node, self.placement.mesh.size)

    def actor_options(self, rank: int) -> dict[str, Any]:
        """Ray's actor options for rank ``rank``'s resources (``num_cpus``, ``num_gpus``,
        ``memory``, custom ``resources``), without the scheduling strategy.

        Example::

            >>> ray_plan(DeviceMesh(tp=2), resources_per_rank={"CPU": 1, "disk": 2}).actor_options(0)
            {'num_cpus': 1.0, 'num_gpus': 0.0, 'resources': {'disk': 2.0}}
        """
        self.placement.mesh._check_rank(rank)
        need = dict(self.rank_resources)
        options: dict[str, Any] = {
            "num_cpus": need.pop("CPU", 0.0),
            "num_gpus": need.pop("GPU", 0.0),
        }
        if "memory" in need:
            options["memory"] = need.pop("memory")
        options["resources"] = need
        return options


def ray_plan(
    mesh: DeviceMesh,
    ranks_per_node: int | None = None,
    resources_per_rank: Mapping[str, float] | None = None,
    num_gpus: float = 0,
) -> RayPlan:
    """The placement group for ``mesh`` on Ray: ``ranks_per_node`` consecutive ranks per node
    (default: the whole mesh on one node), each rank taking ``resources_per_rank`` (default
    ``{"CPU": 1}``) and ``num_gpus`` GPUs.

    Example::

        >>> ray_plan(DeviceMesh(dp=2, tp=2)).bundles
        ({'CPU': 4.0},)
    """
    if not isinstance(mesh, DeviceMesh):
        raise TopoTypeError(
            f"topo.ray requires a topo.DeviceMesh, but got {type(mesh).__name__}; pass e.g. "
            f"topo.DeviceMesh(dp=2, tp=2)"
        )
    rpn = (
        mesh.size
        if ranks_per_node is None
        else as_int(ranks_per_node, "topo.ray ranks_per_node", minimum=1)
    )
    placement = mesh.placement(rpn)
    need = _resources(resources_per_rank, num_gpus)
    per_node = min(placement.ranks_per_node, mesh.size)
    bundle_of_rank = tuple(placement.node_of(r) for r in range(mesh.size))
    counts = [bundle_of_rank.count(node) for node in range(placement.num_nodes)]
    bundles = tuple({k: v * n for k, v in need.items()} for n in counts)
    strategy = "STRICT_PACK" if placement.num_nodes == 1 else "STRICT_SPREAD"
    local = tuple(r % per_node for r in range(mesh.size))
    return RayPlan(placement, need, bundles, strategy, bundle_of_rank, local)


def _resources(given: Mapping[str, float] | None, num_gpus: object) -> dict[str, float]:
    """One rank's resources: ``given`` (default ``{"CPU": 1}``) plus ``num_gpus`` as ``GPU``,
    zero amounts dropped (Ray refuses them in a bundle)."""
    gpus = _amount(num_gpus, "topo.ray num_gpus")
    if given is None:
        need = dict(DEFAULT_RESOURCES)
    elif isinstance(given, Mapping):
        need = {}
        for name, value in given.items():
            if not isinstance(name, str) or not name:
                raise TopoTypeError(
                    f"topo.ray resources_per_rank requires resource names as non-empty str, but "
                    f"got {name!r}; pass e.g. {{'CPU': 1}}"
                )
            if name == "GPU":
                raise TopoValueError(
                    f"topo.ray resources_per_rank requires GPUs through num_gpus, but got "
                    f"'GPU': {value!r} in it; fix by passing num_gpus={value!r}"
                )
            need[name] = _amount(value, f"topo.ray resources_per_rank[{name!r}]")
    else:
        raise TopoTypeError(
            f"topo.ray resources_per_rank requires a dict of resource name to amount, like "
            f"{{'CPU': 1}}, but got {type(given).__name__} {given!r}"
        )
    if gpus:
        need["GPU"] = gpus
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        raise TopoValueError(
            f"topo.ray requires each rank to take some resource (Ray cannot place an empty "
            f"bundle), but got resources_per_rank={given!r} and num_gpus={num_gpus!r}; fix by "
            f"giving each rank e.g. {{'CPU': 1}}"
        )
    return need


def _amount(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TopoTypeError(f"{what} requires a number, but got {type(value).__name__} {value!r}")
    amount = float(value)
    if not (math.isfinite(amount) and amount >= 0):
        raise TopoValueError(
            f"{what} requires a non-negative, finite number, but got {value!r}; pass e.g. 1"
        )
    return amount


def place(plan: RayPlan, timeout: float, name: str = "") -> Any:
    """Ask Ray for ``plan``'s placement group and wait until it is placed, at most ``timeout``
    seconds; a group Ray cannot place by then is removed and a
    :class:`~topo.errors.RendezvousTimeout` says what the cluster lacks.

    Example::

        pg = place(ray_plan(mesh, ranks_per_node=8, num_gpus=1), timeout=60)
    """
    ray = require_ray()
    from ray.util.placement_group import placement_group, remove_placement_group

    start = time.monotonic()
    group = placement_group(list(plan.bundles), strategy=plan.strategy, name=name)
    try:
        return _wait_placed(ray, group, plan, timeout, start)
    except BaseException:  # a timeout, Ctrl-C, a warning made an error: leave no group behind
        remove_placement_group(group)
        raise


def _wait_placed(ray: Any, group: Any, plan: RayPlan, timeout: float, start: float) -> Any:
    if not group.wait(0):
        short = _shortfall(plan, _node_totals(ray))
        if short is not None:  # say so now, not after the whole timeout
            more = (
                "nodes with more GPUs (or fewer ranks_per_node)"
                if "GPU" in plan.rank_resources
                else f"more resources, e.g. ray.init(num_cpus={plan.placement.mesh.size})"
            )
            warnings.warn(
                f"topo.ray: {short}; waiting up to {timeout:.0f} s for nodes to join (an "
                f"autoscaler may add them), then RendezvousTimeout. Fix by starting Ray with "
                f"{more}, or by lowering resources_per_rank/num_gpus",
                RuntimeWarning,
                stacklevel=4,
            )
    if not group.wait(max(1, math.ceil(timeout - (time.monotonic() - start)))):
        try:
            free = ray.available_resources()
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        except Exception:  # only for the message
            free, nodes = {}, -1
        raise RendezvousTimeout(
            f"topo.ray requires a placement group of {plan.num_nodes} bundle(s) "
            f"{list(plan.bundles)} with strategy {plan.strategy} (one bundle per node of "
            f"{plan.placement!r}), but Ray could not place it within "
            f"{time.monotonic() - start:.0f} s ({nodes} live node(s), free: {free}); fix by "
            f"adding nodes or resources, lowering resources_per_rank/num_gpus, or choosing "
            f"ranks_per_node to match the nodes"
        )
    return group


def _node_totals(ray: Any) -> list[dict[str, float]]:
    """Each live Ray node's total resources (empty when Ray cannot say)."""
    try:
        return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    except Exception:  # only for a warning
        return []


def _shortfall(plan: RayPlan, nodes: list[dict[str, float]]) -> str | None:
    """Why ``plan`` can never be placed on ``nodes`` (their total resources, not what is free
    now), or ``None`` when it could be (or Ray could not say): each bundle needs a node of its
    own (STRICT_SPREAD; STRICT_PACK has one bundle), and the bundles are alike (the plan's
    nodes hold equally many ranks), so count the nodes that hold one.

    Example::

        >>> print(_shortfall(ray_plan(DeviceMesh(tp=4)), [{"CPU": 2.0}]))
        the placement group needs 1 node(s) that each hold {'CPU': 4.0} (one per node of \
the plan), but 0 of the live nodes do; their totals: [{'CPU': 2.0}]
    """
    if not nodes:
        return None
    bundle = plan.bundles[0]
    fits = sum(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes)
    if fits >= len(plan.bundles):
        return None
    shown = [{k: node.get(k, 0.0) for k in bundle} for node in nodes]
    return (
        f"the placement group needs {len(plan.bundles)} node(s) that each hold {bundle} (one "
        f"per node of the plan), but {fits} of the live nodes do; their totals: {shown}"
    )

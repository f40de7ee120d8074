"""torch.library custom ops for topo's collectives: ``torch.ops.topo.<name>``.

One module per collective holds its op, its fake (meta) implementation and its autograd rule.
The free functions in :mod:`topo.collectives` route a call here only when the input requires
grad or torch.compile is tracing (see :func:`topo.ops._library.needs_op`); plain eager calls
go straight to the communicator. Every op is marked side-effecting, so a compiled graph keeps
it (in program order) even where a rank ignores the result. See docs/autograd.md and
docs/compile.md.

The ops are registered on first need, not at import: ``import topo`` and plain collectives
never pay for ``torch.library`` registration (about 0.1 s). :func:`load` registers them; the
differentiable and compiled paths call it (through ``topo.ops._library.group_of``), and code
that calls ``torch.ops.topo.<name>`` directly calls it first.
"""

import importlib

__all__: list[str] = []

#: The ops topo defines (``torch.ops.topo.<name>``), for opcheck and documentation.
OP_NAMES = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "scatter",
    "gather",
    "chunk",
    "unchunk",
    "all_to_all",
    "all_to_allv",
    "all_gatherv",
    "reduce_scatterv",
    "ppermute",
    "not_differentiable",
)


#: The modules that define the ops (importing one registers its ops).
_MODULES = (
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_allv",
    "broadcast",
    "gather",
    "no_grad",
    "ppermute",
    "reduce_scatter",
    "scatter",
    "uneven",
)


def load() -> None:
    """Register every ``torch.ops.topo.<name>`` op (once; later calls return at once).

    Example::

        import topo.ops

        topo.ops.load()
        torch.ops.topo.all_reduce   # now defined
    """
    for name in _MODULES:
        importlib.import_module(f"topo.ops.{name}")

"""torch.library custom ops for topo's collectives: ``torch.ops.topo.<name>``.

One module per collective holds its op, its fake (meta) implementation and its autograd rule.
The free functions in :mod:`topo.collectives` route a call here only when the input requires
grad or torch.compile is tracing (see :func:`topo.ops._library.needs_op`); plain eager calls
go straight to the communicator. Every op is marked side-effecting, so a compiled graph keeps
it (in program order) even where a rank ignores the result. See docs/autograd.md and
docs/compile.md.
"""

from topo.ops import (  # noqa: F401  (importing a module registers its ops)
    all_gather,
    all_reduce,
    all_to_all,
    broadcast,
    gather,
    no_grad,
    ppermute,
    reduce_scatter,
    scatter,
)

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
    "ppermute",
    "not_differentiable",
)

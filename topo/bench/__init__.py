"""``topo bench``: time topo's collectives against the raw torch ProcessGroup calls.

Sweeps message sizes for each collective on each benchmarked axis and prints an
nccl-tests-style table: size, count, dtype, op, time (µs), algbw and busbw (GB/s), #wrong
(elements that differ from the reference, summed over ranks) and the ratio of topo's time to
the raw ``ProcessGroupGloo`` call on the same group, measured in the same run.

It runs on a local mesh through :func:`topo.spawn` (default ``dp=2,tp=2``: 4 CPU processes),
or, when torchrun/Slurm/mpirun variables are present, as one rank of that launch.

One job per module: :mod:`~topo.bench.config` (options, sizes, :class:`BenchConfig`),
:mod:`~topo.bench.measure` (timing on each rank), :mod:`~topo.bench.reference` (inputs and
the #wrong check), :mod:`~topo.bench.report` (aggregation, table, CSV, plot) and
:mod:`~topo.bench.command` (``topo bench`` itself). Their names are re-exported here.

Example::

    from topo.bench import BenchConfig, aggregate, format_table, run_rank
"""

from topo.bench.command import run
from topo.bench.config import COLLECTIVES as COLLECTIVES
from topo.bench.config import BenchConfig, add_arguments
from topo.bench.config import config_from_args as config_from_args
from topo.bench.config import format_size as format_size
from topo.bench.config import parse_size as parse_size
from topo.bench.measure import RawGroup as RawGroup
from topo.bench.measure import run_rank
from topo.bench.report import BUS_FACTORS as BUS_FACTORS
from topo.bench.report import aggregate, format_table
from topo.bench.report import plot as plot
from topo.bench.report import to_csv as to_csv

# The other names above (``X as X``) stay importable from here, as before the split.
__all__ = ["BenchConfig", "add_arguments", "aggregate", "format_table", "run", "run_rank"]

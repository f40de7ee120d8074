"""``python -m topo``: the ``topo`` command line (see :mod:`topo.cli`).

Example::

    $ python -m topo plan dp=2 tp=2
"""

import sys

from topo.cli import main

if __name__ == "__main__":
    sys.exit(main())

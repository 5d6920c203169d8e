"""``python -m torch_ar``: the experiment CLI, see :mod:`torch_ar.experiments.cli`."""

import sys

from torch_ar.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())

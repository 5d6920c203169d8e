"""``python -m torch_ar``: see :mod:`torch_ar.cli`."""

import sys

from torch_ar.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m MedDiffFMLib.worker``: see :mod:`MedDiffFMLib.worker.server`."""

import sys

from .server import main

if __name__ == "__main__":  # importing this module (e.g. walking the package) runs nothing
    sys.exit(main())

"""``python -m MedDiffFMLib.worker``: see :mod:`MedDiffFMLib.worker.server`."""

import sys

from .server import main

sys.exit(main())

"""``python -m MedDiffFMLib.speed``."""

import sys

from .report import main

if __name__ == "__main__":  # not when a tool imports every module
    sys.exit(main())

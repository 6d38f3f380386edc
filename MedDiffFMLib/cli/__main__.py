"""``python -m MedDiffFMLib.cli ...`` (as under ``torchrun``) runs the command line."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

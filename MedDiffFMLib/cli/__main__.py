"""``python -m MedDiffFMLib.cli ...`` (as under ``torchrun``) runs the command line."""

import sys

from . import main

sys.exit(main())

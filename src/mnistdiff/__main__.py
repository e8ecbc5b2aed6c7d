"""``python -m mnistdiff`` (and ``torchrun -m mnistdiff``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())

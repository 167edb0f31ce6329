"""`python -m stitch` (and `torchrun -m stitch train ...`) runs the `stitch` command."""

import sys

from stitch.cli import main

sys.exit(main())

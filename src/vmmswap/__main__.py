"""``python -m vmmswap ...`` runs the ``vmmswap`` command line."""

import sys

from vmmswap.cli import main

sys.exit(main())

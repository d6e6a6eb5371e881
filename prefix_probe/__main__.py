"""``python -m prefix_probe ...`` runs the ``probe`` command line."""

import sys

from prefix_probe.cli import main

sys.exit(main())

"""``python -m mpsearch`` runs the command line."""

import sys

from mpsearch.cli import main

sys.exit(main())

"""``python -m mpsearch`` runs the command line."""

import sys

from mpsearch.cli.main import main

sys.exit(main())

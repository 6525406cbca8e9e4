"""``python -m services.ingest.simulator``."""

import sys

from services.ingest.simulator.cli import main

sys.exit(main())

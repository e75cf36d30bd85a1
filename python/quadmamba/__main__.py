"""``python -m quadmamba``: the quadmamba command line (see quadmamba.cli)."""
import sys

from quadmamba.cli import main

sys.exit(main())

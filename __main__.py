"""`python -m fluxbridge ...`: the same as the `fluxbridge` command."""
import sys

from .headless.cli import main

sys.exit(main())

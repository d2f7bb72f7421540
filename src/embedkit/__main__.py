"""``python -m embedkit``: the same command line as the ``embedkit`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m reasonmaxxer.cli` = the `reasonmaxxer` command (as `python -m reasonmaxxer`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

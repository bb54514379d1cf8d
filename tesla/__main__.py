"""``python -m tesla`` is the same as the ``tesla`` command."""

import sys

from tesla.cli import main

if __name__ == "__main__":  # not when a worker process started by spawn imports the main module
    sys.exit(main())

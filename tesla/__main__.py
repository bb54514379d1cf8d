"""``python -m tesla`` is the same as the ``tesla`` command."""

import sys

from tesla.cli import main

sys.exit(main())

"""``python -m optolab …`` is the ``optolab`` command."""

import sys

from optolab.cli import main

sys.exit(main())

"""``python -m memfs.cli``: the ``memfs`` command."""

import sys

from . import main

sys.exit(main())

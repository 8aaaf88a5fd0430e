"""``python -m fusepass``: the same as the ``fusepass`` command."""

import sys

from .cli import main

sys.exit(main())

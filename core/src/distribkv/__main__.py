"""``python -m distribkv`` is the ``distribkv`` command."""

import sys

from distribkv.cli import main

sys.exit(main())

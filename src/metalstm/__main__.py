"""``python -m metalstm``: the command-line interface."""

import sys

from .entry import main

sys.exit(main())

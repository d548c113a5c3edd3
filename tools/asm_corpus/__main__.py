"""``python -m tools.asm_corpus``: the command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m elit_kernels.bench``: the same as the ``elit-bench`` console script."""
import sys

import elit_kernels_cli

from .cli import main

sys.exit(elit_kernels_cli.run_started("elit-bench", main))  # ends the start-up Ctrl-C guard

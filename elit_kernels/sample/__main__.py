"""``python -m elit_kernels.sample`` (and ``torchrun ... -m elit_kernels.sample``): the ``elit-sample`` CLI."""
import sys

import elit_kernels_cli

from .cli import main

sys.exit(elit_kernels_cli.run_started("elit-sample", main))  # ends the start-up Ctrl-C guard

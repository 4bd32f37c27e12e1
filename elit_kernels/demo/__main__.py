import sys

import elit_kernels_cli

from . import main

sys.exit(elit_kernels_cli.run_started("elit-demo", main))  # ends the start-up Ctrl-C guard

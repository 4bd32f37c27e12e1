"""``python -m elit_kernels.sample`` (and ``torchrun ... -m elit_kernels.sample``): the ``elit-sample`` CLI."""
import sys

from .cli import main

sys.exit(main())

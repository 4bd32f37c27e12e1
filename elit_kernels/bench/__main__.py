"""``python -m elit_kernels.bench``: the same as the ``elit-bench`` console script."""
import sys

from .cli import main

sys.exit(main())

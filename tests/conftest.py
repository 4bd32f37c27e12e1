import os

import torch

# The Triton kernels run on CPU through Triton's interpreter, which must be switched on before
# triton is first imported (pytest imports every test module before running any test).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

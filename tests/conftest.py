"""Test setup shared by the suite.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported (triton.jit reads TRITON_INTERPRET when it decorates a kernel). A value
the user set is kept; on a CUDA machine the kernels run compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

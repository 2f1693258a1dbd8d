"""Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors (small shapes).

The variable must be set before triton is first imported, hence here, before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""tests/ops: the Triton kernels run under Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before vlsi.ops.triton_head is
imported (vlsi.ops imports it lazily). Only set when CUDA is absent, so on a GPU machine the same tests check
the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

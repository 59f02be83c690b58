"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable must be set
before any kernel module is imported, which is why it lives here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import os

import torch


def compile_on_cuda(fn):
    """torch.compile `fn` for CUDA tensors (the first argument decides); run it as written elsewhere.

    Fusing the small elementwise steps around each matmul (norms, rotary, SiLU) cuts a decode step's
    kernel count several-fold, which is most of its time at small batches. The CPU path stays eager and
    exact, so that the tests on CPU compare it with transformers op for op.
    Set NANOVLLM_NO_COMPILE=1 to run everything eagerly.
    """
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("NANOVLLM_NO_COMPILE"):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    return wrapper

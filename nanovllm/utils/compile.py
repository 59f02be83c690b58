import functools
import os

import torch


def compile_on_cuda(fn):
    """torch.compile `fn` for CUDA tensors (the first argument decides); run it as written elsewhere.

    Used for the sampler's Gumbel-max pass (one fused kernel instead of five). The layers' small elementwise
    steps have hand-written Triton kernels instead (layers/kernels.py): a compiled call costs ~90 us of host
    time, which eager prompt steps would pay ~100 times per step. The CPU path stays eager and exact.
    Set NANOVLLM_NO_COMPILE=1 to run it eagerly.
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

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with Hugging Face's rounding: normalize in float32, round, then scale by the weight.

    Called with a residual, it first adds it (rounded to the activations' dtype, as HF does) and
    returns the sum too. On CUDA one Triton kernel does all of it (layers/kernels.py); the torch functions
    below are the CPU path and the kernels' reference.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from nanovllm.layers import kernels  # imported late: tests set TRITON_INTERPRET first
            normed, summed = kernels.rms_norm(x, self.weight, self.eps, residual)
            return normed if residual is None else (normed, summed)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x + residual
    return rms_norm(h, weight, eps), h

import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


class RMSNorm(nn.Module):
    """RMSNorm with Hugging Face's rounding: normalize in float32, round, then scale by the weight.

    Called with a residual, it first adds it (rounded to the activations' dtype, as HF does) and
    returns the sum too, in one fused kernel on CUDA.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


@compile_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@compile_on_cuda
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x + residual
    return rms_norm.__wrapped__(h, weight, eps), h

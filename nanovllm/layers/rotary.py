import math

import torch
from torch import nn


SUPPORTED_ROPE_TYPES = ("default", "llama3")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form), cos/sin tabled once on the model's device.

    Each model builds its own table: sharing one module between devices is how a PD engine ends up
    reading GPU0 memory from GPU1.
    """

    def __init__(self, head_dim: int, max_position: int, rope_parameters: dict):
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        base = rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        if rope_type == "llama3":
            inv_freq = _llama3_scaled(inv_freq, rope_parameters)
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        positions = torch.arange(max_position, dtype=torch.float)  # on the model's device, like HF's forward
        inv_freq = inv_freq.to(positions.device)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, looked up once per step and shared by all layers."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [T, Hq, D], k: [T, Hkv, D]. Like Hugging Face, cos/sin are rounded to the activations' dtype.
    (On CUDA the model runs layers/kernels.py's rotate_qk instead; this is its reference.)"""
    cos = cos.to(q.dtype).unsqueeze(1)
    sin = sin.to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _llama3_scaled(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1's frequency scaling: long wavelengths slowed by `factor`, a smooth ramp in between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)

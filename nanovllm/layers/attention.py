"""Attention over the paged KV cache, with one backend per device kind.

- "torch": plain PyTorch, slow and exact; the CPU path, and the reference the others are tested against.
- "triton": CUDA without flash-attn: Triton kernels for prompt attention and decode attention over the paged
  cache, and for writing K/V into it. (Before the cache exists, in the memory-sizing warm-up, prompts run
  through `varlen_attn`, flash-based, in PyTorch; in float32, which flash kernels lack, through the torch path.)
- "flash": flash-attn's varlen and KV-cache kernels, when the package is installed (needs blocks of a
  multiple of 256 tokens).
"""
import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import Context

logger = logging.getLogger("nanovllm")


def select_backend(device: torch.device, block_size: int) -> str:
    if device.type == "cpu":
        return "torch"
    try:
        import flash_attn  # noqa: F401
        if block_size % 256 == 0:
            return "flash"
        logger.warning("flash-attn needs kv_cache_block_size to be a multiple of 256; using triton")
    except ImportError:
        pass
    return "triton"


class Attention(nn.Module):

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend = "torch"
        # Views into the runner's cache: [num_blocks, block_size, num_kv_heads, head_dim], block-strided.
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
                kv_stored: bool = False) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, Hq, D]. `kv_stored`: the caller has
        already written k and v into the cache (the rotary kernel does, on CUDA)."""
        has_cache = self.k_cache.numel() > 0  # no cache during the memory-sizing warm-up
        if has_cache and not kv_stored:
            store = store_kvcache_torch if self.backend == "torch" else _triton().store_kvcache
            store(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            if self.backend == "flash":
                return self._flash_prefill(q, k, v, ctx)
            if self.backend == "triton" and has_cache:  # the context straight from the cache, one launch
                return _triton().paged_prefill_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                                         ctx.cu_seqlens_q, ctx.context_lens, self.scale)
            if ctx.prefix_rows is not None:  # part of the context comes from the cache
                k, v = self.k_cache[ctx.prefix_rows], self.v_cache[ctx.prefix_rows]
            if self.backend == "torch" or q.dtype == torch.float32:  # flash kernels have no fp32
                return prefill_attention_torch(q, k, v, ctx, self.scale)
            return _varlen_attn(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                ctx.max_seqlen_k, scale=self.scale, window_size=(-1, 0))
        if self.backend == "torch":
            return decode_attention_torch(q, self.k_cache, self.v_cache, ctx, self.scale)
        if self.backend == "flash":
            from flash_attn import flash_attn_with_kvcache
            return flash_attn_with_kvcache(q.unsqueeze(1), self.k_cache, self.v_cache, cache_seqlens=ctx.context_lens,
                                           block_table=ctx.block_tables, softmax_scale=self.scale,
                                           causal=True).squeeze(1)
        return _triton().paged_decode_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                                ctx.context_lens, self.scale)

    def _flash_prefill(self, q, k, v, ctx: Context):
        from flash_attn import flash_attn_varlen_func
        block_table = None
        if ctx.prefix_rows is not None:
            k, v, block_table = self.k_cache, self.v_cache, ctx.block_tables
        return flash_attn_varlen_func(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                      ctx.max_seqlen_k, softmax_scale=self.scale, causal=True,
                                      block_table=block_table)


def _triton():
    from nanovllm.layers import kernels  # imported late: TRITON_INTERPRET must be set first in tests
    return kernels


def _varlen_attn(q, k, v, *args, **kwargs):
    varlen_attn, gqa_flag = _varlen_attn_fn()
    return varlen_attn(q, k, v, *args, **kwargs, **gqa_flag)


@functools.cache
def _varlen_attn_fn():
    from torch.nn.attention.varlen import varlen_attn
    takes_flag = "enable_gqa" in inspect.signature(varlen_attn).parameters  # torch >= 2.12 asks for it
    return varlen_attn, {"enable_gqa": True} if takes_flag else {}


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The K (or V) rows of the given slots, as [len(slots), Hkv, D]."""
    block_size = cache.size(1)
    return cache[slots // block_size, slots % block_size]


def store_kvcache_torch(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.size(1)
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]


def prefill_attention_torch(q, k, v, ctx: Context, scale: float) -> torch.Tensor:
    """Causal attention per sequence; queries are the last seqlen_q of each sequence's seqlen_k tokens."""
    cu_q, cu_k = ctx.cu_seqlens_q.tolist(), ctx.cu_seqlens_k.tolist()
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        len_q, len_k = qs.stop - qs.start, ks.stop - ks.start
        mask = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).tril(len_k - len_q)
        out[qs] = _sdpa(q[qs], k[ks], v[ks], mask, scale)
    return out


def decode_attention_torch(q, k_cache, v_cache, ctx: Context, scale: float) -> torch.Tensor:
    block_size = k_cache.size(1)
    out = torch.empty_like(q)
    for i, (context_len, block_table) in enumerate(zip(ctx.context_lens.tolist(), ctx.block_tables)):
        positions = torch.arange(context_len, device=q.device)
        slots = block_table[positions // block_size].long() * block_size + positions % block_size
        out[i:i + 1] = _sdpa(q[i:i + 1], gather_slots(k_cache, slots), gather_slots(v_cache, slots), None, scale)
    return out


def _sdpa(q, k, v, mask, scale):
    """q: [Lq, Hq, D], k/v: [Lk, Hkv, D] -> [Lq, Hq, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)

from dataclasses import dataclass

import numpy as np
import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or numpy array as a tensor on `device`; on CUDA through pinned memory, without blocking."""
    if isinstance(data, np.ndarray):
        tensor = torch.from_numpy(data).to(dtype)
    else:
        tensor = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class Context:
    """Per-step attention metadata, passed explicitly through the model (two runners share a process)."""
    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int32: where each new token's K/V goes; -1 = padding
    # prefill
    cu_seqlens_q: torch.Tensor | None = None  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # Set when some context comes from the cache (a prefix hit, or earlier chunks of the prompt): every context
    # token's cache row, as (block ids, offsets in block), each [sum of context lens] int64.
    prefix_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    # both: each sequence's length including this step's tokens, and its cache blocks (prefill: once the cache
    # exists; the padding pseudo-sequence has a row too)
    context_lens: torch.Tensor | None = None  # [num_seqs] int32
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32

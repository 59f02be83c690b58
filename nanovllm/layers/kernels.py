"""Triton kernels for the paged KV cache: writing new K/V, and prompt and decode attention.

Cache layout. The engine allocates one tensor per device,

    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

block-major, so that one block of every layer is a single contiguous range (cheap to ship
between devices). A layer sees the views ``k_cache = kv_cache[:, layer, 0]`` and
``v_cache = kv_cache[:, layer, 1]``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Only the last three dims are dense: stride(0) jumps over all the other layers, so every kernel
takes the strides it is given and never assumes a contiguous first dim.

A *slot* is ``block_id * block_size + offset_in_block``; slot -1 marks a padding row to skip.
A sequence's tokens live in the blocks its block-table row lists, in order.

Addresses are computed in int64: block_id * stride(0) overflows int32 for any realistic cache.

The kernels run unchanged in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which
is how CI tests them; they stick to language features present from Triton 3.0 on.
"""
import functools

import torch
import triton
import triton.language as tl

__all__ = ["store_kvcache", "paged_decode_attention", "paged_prefill_attention", "rms_norm", "rotate_qk",
           "silu_and_mul"]


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------

@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HD_PAD: tl.constexpr,
):
    # One program per token: all heads of the token are one short row of the cache.
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok)
    # Flatten (head, dim) so a non-power-of-two head count needs only one pad + mask.
    i = tl.arange(0, HD_PAD)
    h = i // HEAD_DIM
    d = i % HEAD_DIM
    # A skipped slot (-1) turns into an all-false mask rather than an early return. (Built as
    # one comparison: the interpreter mistypes `block_mask & scalar_mask` as int32.)
    mask = i < (slot >= 0).to(tl.int32) * (NUM_HEADS * HEAD_DIM)
    block = (slot // BLOCK_SIZE).to(tl.int64)
    off = slot % BLOCK_SIZE
    tok64 = tok.to(tl.int64)

    k = tl.load(key_ptr + tok64 * stride_kn + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + tok64 * stride_vn + h * stride_vh + d, mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + off * stride_kct + h * stride_kch + d
    v_dst = v_cache_ptr + block * stride_vcb + off * stride_vct + h * stride_vch + d
    tl.store(k_dst, k.to(k_dst.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_dst.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key[i] / value[i] ([N, kv_heads, head_dim]) into the cache at slot_mapping[i]."""
    n, num_heads, head_dim = key.shape
    block_size = k_cache.shape[1]
    _check_cache(k_cache, v_cache, num_heads, head_dim)
    if value.shape != key.shape or slot_mapping.shape != (n,):
        raise ValueError(f"shape mismatch: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"slot_mapping {tuple(slot_mapping.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a unit stride on head_dim")
    if n == 0:
        return
    _store_kvcache_kernel[(n,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HD_PAD=triton.next_power_of_2(num_heads * head_dim),
    )


# ---------------------------------------------------------------------------------------------
# paged_decode_attention
# ---------------------------------------------------------------------------------------------

@triton.jit
def _kv_tile(table_row, k_head, v_head, start, end, stride_kb, stride_kt, stride_vb, stride_vt,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """K and V of tokens [start, start + BLOCK_N) of one sequence and kv head, rows at or past `end` zero, and
    which rows are before `end`. BLOCK_N divides BLOCK_SIZE, so a tile never straddles two cache blocks and needs
    a single block-table lookup; table entries past the sequence are never read."""
    n = tl.arange(0, BLOCK_N)
    block = tl.load(table_row + start // BLOCK_SIZE).to(tl.int64)
    rows = (start % BLOCK_SIZE + n)[:, None]
    valid = start + n < end
    k = tl.load(k_head + block * stride_kb + rows * stride_kt, mask=valid[:, None], other=0.0)
    v = tl.load(v_head + block * stride_vb + rows * stride_vt, mask=valid[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, valid


@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v):
    """Fold one tile of scores `s` (log2 units, masked with -inf) and its V into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, m_ptr, l_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program = one (sequence, kv head, split): each K/V tile is read once and used by
    every q head of the group, which is what makes GQA decode bandwidth-bound, not
    load-count-bound. The kv head is the grid's fastest axis, so programs start sequence by
    sequence, in batch order: the scheduler puts the longest contexts first, and the short ones
    fill in at the end (longest-processing-time-first), instead of a long one starting last."""
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + b)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    # Splits own whole tiles; a split past the end of a short sequence does no work and
    # reports an empty softmax (m = -inf, l = 0), which the reduce step weighs as zero.
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh + d[None, :]
    v_head = v_cache_ptr + kvh * stride_vh + d[None, :]

    for t in range(tile_lo, tile_hi):
        start = t * BLOCK_N
        k, v, valid = _kv_tile(table_row, k_head, v_head, start, ctx, stride_kb, stride_kt, stride_vb, stride_vt,
                               BLOCK_SIZE, BLOCK_N, UPCAST)

        # Scores in log2 units (qk_scale folds in log2(e)) so exp2 can be used.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v)

    out_mask = (g < GROUP)[:, None]
    o_rows = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
    if NUM_SPLITS == 1:
        # l == 0 only for an empty sequence (e.g. a zero-length padding row in a CUDA graph):
        # write zeros there instead of NaN.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_rows, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(o_rows + split * stride_os, acc, mask=out_mask)
        ml_off = b.to(tl.int64) * stride_mb + heads * stride_mh + split
        tl.store(m_ptr + ml_off, m_i, mask=g < GROUP)
        tl.store(l_ptr + ml_off, l_i, mask=g < GROUP)


@triton.jit
def _split_reduce_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_mb, stride_mh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Merge the per-split softmax states of one (sequence, q head)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < NUM_SPLITS
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + s, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ptr + b * stride_mb + h * stride_mh + s, mask=s_mask, other=0.0)
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    # All splits empty only for an empty sequence; avoid -inf - -inf = NaN.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(w * l, axis=0)
    l_sum = tl.where(l_sum == 0.0, 1.0, l_sum)
    out = tl.sum(part * w[:, None], axis=0) / l_sum
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache.

    q: [B, num_q_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads,
    head_dim] (strided views); block_tables: int32 [B, max_blocks]; context_lens: int32 [B].
    Returns [B, num_q_heads, head_dim] in q's dtype. No host syncs: CUDA-graph capturable.
    num_splits overrides the split-K heuristic (tests and benchmarks use it).
    """
    return _decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)


def _decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None,
            block_n=None, num_warps=None, num_stages=None):
    """paged_decode_attention with every launch knob exposed, for the benchmark's sweeps."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    _check_attention_inputs(q, k_cache, v_cache)
    group = num_q_heads // num_kv_heads
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out

    block_n = block_n or _default_block_n(block_size, head_dim, q.element_size())
    if block_size % block_n:
        raise ValueError(f"block_n {block_n} must divide block_size {block_size}")
    num_splits = _pick_num_splits(num_splits, batch * num_kv_heads,
                                  block_tables.shape[1] * block_size // block_n, q.device)
    # Hopper/Ampere: 4 warps cover a [16 x BLOCK_N] mma tile and the 2 x BLOCK_N x head_dim
    # loads; 3 stages keep ~2 tiles of K/V in flight per program, enough to hide HBM latency.
    launch = dict(num_warps=num_warps or 4, num_stages=num_stages or 3)

    common = (q, k_cache, v_cache, block_tables, context_lens)
    strides = (q.stride(0), q.stride(1),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
               block_tables.stride(0))
    meta = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=block_n,
                NUM_SPLITS=num_splits,
                # The interpreter (CPU tensors) multiplies bf16 as raw uint16: give it fp32.
                UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16)
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernel works with exp2
    grid = (num_kv_heads, batch, num_splits)
    if num_splits == 1:
        _paged_decode_kernel[grid](*common, out, out, out, qk_scale, *strides,
                                   out.stride(0), out.stride(1), 0, 0, 0, **meta, **launch)
        return out

    part = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32,
                       device=q.device)
    m = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _paged_decode_kernel[grid](*common, part, m, l, qk_scale, *strides,
                               part.stride(0), part.stride(1), part.stride(2),
                               m.stride(0), m.stride(1), **meta, **launch)
    _split_reduce_kernel[(batch, num_q_heads)](
        part, m, l, out,
        part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# paged_prefill_attention
# ---------------------------------------------------------------------------------------------
# Prompt chunks attend to their whole context straight from the paged cache (their own K/V already stored
# there): no gather of a chunk's earlier tokens into a dense copy, one launch per layer, and a grid that
# depends only on the step's token and sequence counts, never on their lengths, so a step can be captured
# in a CUDA graph for a token bucket.

@triton.jit(do_not_specialize=["num_seqs"])  # eager steps vary it: one compiled variant, not three
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program = BLOCK_M query tokens of one sequence x every q head of one kv group, so each K/V tile is
    read once per group (GQA). Sequence i owns tiles cu_q[i] // BLOCK_M + i onwards (at least its
    cdiv(len_q, BLOCK_M) tiles): a binary search over cu_seqlens_q finds a program's sequence, and tiles past a
    sequence's queries do nothing. Query j of a chunk of len_q is token seq_len - len_q + j of its sequence and
    sees tokens 0..itself."""
    kvh = tl.program_id(0)
    tile = tl.program_id(1)
    # The last sequence whose first tile is at or before this one.
    lo = 0
    hi = num_seqs
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid
        go_right = (mid < hi) & (first <= tile)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    len_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m0 = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M  # this tile's first query, within the chunk
    if m0 < len_q:
        seq_len = tl.load(seq_lens_ptr + seq)
        # Rows are (query token, head in the group) pairs: token r // GROUP_PAD, head r % GROUP_PAD.
        r = tl.arange(0, BLOCK_M * GROUP_PAD)
        tok = m0 + r // GROUP_PAD
        g = r % GROUP_PAD
        row_ok = (tok < len_q) & (g < GROUP)
        pos = seq_len - len_q + tok  # each row's position in its sequence: it sees keys 0..pos
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        q_rows = (q_start + tok).to(tl.int64) * stride_qt + (kvh * GROUP + g) * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.zeros([BLOCK_M * GROUP_PAD], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M * GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_head = k_cache_ptr + kvh * stride_kh + d[None, :]
        v_head = v_cache_ptr + kvh * stride_vh + d[None, :]
        # Keys up to this tile's last query: tiles past it are masked out entirely (causal).
        key_end = tl.minimum(seq_len, seq_len - len_q + m0 + BLOCK_M)
        for t in range(0, tl.cdiv(key_end, BLOCK_N)):
            start = t * BLOCK_N
            k, v, key_ok = _kv_tile(table_row, k_head, v_head, start, key_end, stride_kb, stride_kt, stride_vb,
                                    stride_vt, BLOCK_SIZE, BLOCK_N, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # log2 units: exp2 below
            # Key 0 is visible to every row (pos >= 0), so no row is all -inf and m stays finite.
            # (A sequence of length 0, the padding's, reads no tile at all.)
            s = tl.where(key_ok[None, :] & (start + n[None, :] <= pos[:, None]), s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # zeros, not NaN, where nothing was read
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + (kvh * GROUP + g) * stride_oh
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


SEARCH_STEPS = 16  # binary-search steps for a program's sequence: up to 65,535 sequences a step. Fixed, not
# fitted to each step's count, which would compile a kernel variant per power of two in the middle of serving.


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, block_m: int | None = None, block_n: int | None = None,
                            num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of prompt chunks over the paged KV cache, which already holds their own K/V.

    q: [T, num_q_heads, head_dim], the chunks one after another; cu_seqlens_q: int32 [S + 1], where each
    chunk's queries start in q; seq_lens: int32 [S], each sequence's length including its chunk (the chunk is
    its last tokens; a length of 0 gives zeros, e.g. for padding rows); block_tables: int32 [S, max_blocks].
    Returns [T, num_q_heads, head_dim] in q's dtype. No host syncs, and the grid depends on T and S only:
    CUDA-graph capturable for a fixed T and S (pad with empty chunks). The tile sizes and launch knobs are for
    tests and benchmarks (benchmarks/prefill_kernel.py).
    """
    tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    _check_attention_inputs(q, k_cache, v_cache)
    num_seqs = seq_lens.numel()
    if num_seqs >= 1 << SEARCH_STEPS:
        raise ValueError(f"{num_seqs} sequences in one step: at most {(1 << SEARCH_STEPS) - 1}")
    if cu_seqlens_q.numel() != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries for {num_seqs} sequences")
    out = torch.empty_like(q)
    if tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    # 128 rows (tokens x heads of a group) per program: a 128 x BLOCK_N mma tile; at least 16 tokens.
    block_m = block_m or max(16, 128 // group_pad)
    block_n = block_n or min(block_size, 64)
    if block_size % block_n:
        raise ValueError(f"block_n {block_n} must divide block_size {block_size}")
    grid = (num_kv_heads, tokens // block_m + num_seqs)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        scale * 1.4426950408889634, num_seqs,  # log2(e): the kernel works with exp2
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, SEARCH_STEPS=SEARCH_STEPS,
        # The interpreter (CPU tensors) multiplies bf16 as raw uint16: give it fp32.
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _default_block_n(block_size: int, head_dim: int, itemsize: int = 2) -> int:
    # 16 KiB per K (or V) tile (64 tokens x 128 dims of bf16): big enough for long, coalesced
    # reads, small enough that 3 pipeline stages of K and V fit in shared memory (also in fp32).
    return max(16, min(block_size, triton.next_power_of_2(16384 // (head_dim * itemsize) + 1) // 2))


def _pick_num_splits(requested: int | None, programs: int, max_tiles: int,
                     device: torch.device) -> int:
    # Without splits the grid is batch x kv_heads; HBM needs several resident programs per SM
    # to be saturated, so split the sequence until the grid reaches ~4 per SM. Depends on the
    # batch size and static shapes only, never on context lengths (graph capture).
    if requested is None:
        target = 4 * _sm_count(device)
        requested = 1 if programs >= target else min(64, triton.cdiv(target, programs))
    # Never more splits than the block table has tiles, so a full-length sequence leaves no
    # split idle.
    return max(1, min(requested, max_tiles))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q [tokens, q heads, head_dim] against the cache views both attention kernels read."""
    num_q_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} q heads is not a multiple of {num_kv_heads} kv heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.dot), got {head_dim}")
    if q.stride(-1) != 1:
        raise ValueError("q needs a unit stride on head_dim")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                 head_dim: int) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, kv_heads, "
                         f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if tuple(k_cache.shape[2:]) != (num_heads, head_dim):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} != "
                         f"({num_heads}, {head_dim})")
    block_size = k_cache.shape[1]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a unit stride on head_dim")


# ---------------------------------------------------------------------------------------------
# Fused elementwise layers: RMSNorm (+ residual), q/k RMSNorm + rotary, SiLU-and-multiply
# ---------------------------------------------------------------------------------------------
# One launch each, in place of a torch.compile'd function: on an H200 a compiled call costs ~90 us of host
# time whatever the shape, which eager prompt steps pay ~112 times per step. Each kernel rounds where
# Hugging Face's eager code rounds (to the activations' dtype after the norm, after each product and sum), so
# the results match the torch functions in layers/norm.py, layers/rotary.py and models/decoder.py.

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,
                     stride_xt, stride_xh, stride_rt, stride_ot, stride_oh, stride_ht,
                     n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program = one row of n values: row (token t, head h) of x."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum, rounded like torch's x + residual
        tl.store(h_ptr + t * stride_ht + cols, x, mask=mask)
    xf = x.to(tl.float32)
    y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of x ([T, n], or [T, heads, n] normed per head), after adding `residual`
    ([T, n]) when given. Returns (normed, x + residual or None)."""
    n = x.shape[-1]
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    if x3.stride(-1) != 1:
        raise ValueError("x needs a unit stride on its last dim")
    out = torch.empty(x3.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    if x3.shape[0]:
        r = residual if residual is not None else x3
        hh = h if h is not None else out
        _rms_norm_kernel[(x3.shape[0], x3.shape[1])](
            x3, r, weight, out, hh, x3.stride(0), x3.stride(1), r.stride(0), out.stride(0), out.stride(1),
            hh.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
            num_warps=min(8, max(1, triton.next_power_of_2(n) // 256)))  # ~8 values a thread
    return out.view(x.shape), h


@triton.jit
def _norm_rotate_head(row, w_ptr, cos_row, sin_row, eps, NORM: tl.constexpr, HALF: tl.constexpr):
    """One head's two halves after an optional RMSNorm and the rotate-half rotary embedding, in its dtype."""
    d = tl.arange(0, HALF)
    x1 = tl.load(row + d)
    x2 = tl.load(row + HALF + d)
    dtype = x1.dtype
    if NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        inv = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
        x1 = (tl.load(w_ptr + d).to(tl.float32) * (a * inv).to(dtype).to(tl.float32)).to(dtype)
        x2 = (tl.load(w_ptr + HALF + d).to(tl.float32) * (b * inv).to(dtype).to(tl.float32)).to(dtype)
    c1 = tl.load(cos_row + d).to(dtype).to(tl.float32)  # HF rounds cos/sin to the dtype
    c2 = tl.load(cos_row + HALF + d).to(dtype).to(tl.float32)
    s1 = tl.load(sin_row + d).to(dtype).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d).to(dtype).to(tl.float32)
    y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]; each product and the sum rounded.
    o1 = ((y1 * c1).to(dtype).to(tl.float32) + (-y2 * s1).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((y2 * c2).to(dtype).to(tl.float32) + (y1 * s2).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _rotate_qk_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                      k_cache_ptr, v_cache_ptr, slot_ptr,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                      stride_qot, stride_qoh, stride_kot, stride_koh,
                      stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                      eps, Q_HEADS: tl.constexpr, NORM: tl.constexpr, HALF: tl.constexpr,
                      STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One program = one head of one token, q heads first, then k heads: optional RMSNorm and the rotary
    embedding; with STORE, a k head's program also writes the rotated k and the token's v into the cache."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    cos_row, sin_row = cos_ptr + t * stride_ct, sin_ptr + t * stride_ct
    if h < Q_HEADS:
        o1, o2 = _norm_rotate_head(q_ptr + t * stride_qt + h * stride_qh, qw_ptr, cos_row, sin_row, eps, NORM, HALF)
        out = q_out_ptr + t * stride_qot + h * stride_qoh
        tl.store(out + d, o1)
        tl.store(out + HALF + d, o2)
    else:
        kh = h - Q_HEADS
        o1, o2 = _norm_rotate_head(k_ptr + t * stride_kt + kh * stride_kh, kw_ptr, cos_row, sin_row, eps, NORM, HALF)
        out = k_out_ptr + t * stride_kot + kh * stride_koh
        tl.store(out + d, o1)
        tl.store(out + HALF + d, o2)
        if STORE:
            slot = tl.load(slot_ptr + t)
            # A skipped slot (-1) turns into an all-false mask (one comparison: see _store_kvcache_kernel).
            keep = d < (slot >= 0).to(tl.int32) * HALF
            block = (slot // BLOCK_SIZE).to(tl.int64)
            off = slot % BLOCK_SIZE
            k_dst = k_cache_ptr + block * stride_kcb + off * stride_kct + kh * stride_kch
            tl.store(k_dst + d, o1.to(k_dst.dtype.element_ty), mask=keep)
            tl.store(k_dst + HALF + d, o2.to(k_dst.dtype.element_ty), mask=keep)
            v_row = v_ptr + t * stride_vt + kh * stride_vh
            v_dst = v_cache_ptr + block * stride_vcb + off * stride_vct + kh * stride_vch
            tl.store(v_dst + d, tl.load(v_row + d).to(v_dst.dtype.element_ty), mask=keep)
            tl.store(v_dst + HALF + d, tl.load(v_row + HALF + d).to(v_dst.dtype.element_ty), mask=keep)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
              eps: float, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor | None = None,
              k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
              slot_mapping: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (strided views are fine); cos, sin: [T, D]. RMSNorm per head when the
    weights are given (Qwen3's q/k norm), then the rotary embedding, for q and k in one launch. Returns new q and
    k tensors. Given v ([T, Hkv, D]), the caches and the slot mapping, the same launch also writes the rotated k
    and v into the cache, as store_kvcache does (slot -1: not stored)."""
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[0] != tokens or k.shape[2] != dim:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("q, k, cos and sin need a unit stride on their last dim, cos and sin the same strides")
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {dim}")
    store = k_cache is not None
    if store:
        _check_cache(k_cache, v_cache, kv_heads, dim)
        if v.shape != k.shape or v.stride(-1) != 1 or slot_mapping.shape != (tokens,):
            raise ValueError(f"shape mismatch: k {tuple(k.shape)}, v {tuple(v.shape)}, "
                             f"slot_mapping {tuple(slot_mapping.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens:
        v, k_cache, v_cache, slot_mapping = (v, k_cache, v_cache, slot_mapping) if store else (k, k, k, cos)
        _rotate_qk_kernel[(tokens, q_heads + kv_heads)](
            q, k, v, q_weight if q_weight is not None else q, k_weight if k_weight is not None else k, cos, sin,
            q_out, k_out, k_cache, v_cache, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            k_cache.stride(0), k_cache.stride(1) if store else 0, k_cache.stride(2) if store else 0,
            v_cache.stride(0), v_cache.stride(1) if store else 0, v_cache.stride(2) if store else 0,
            eps, Q_HEADS=q_heads, NORM=q_weight is not None, HALF=dim // 2, STORE=store,
            BLOCK_SIZE=k_cache.shape[1] if store else 1,
            num_warps=1)  # one head is a few hundred bytes: one warp, many programs
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, n, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_xt + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded, as torch's F.silu returns the input dtype
    tl.store(out_ptr + t * stride_ot + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2n] (gate, then up) -> silu(gate) * up, [T, n]."""
    tokens, n = x.shape[0], x.shape[1] // 2
    if x.stride(-1) != 1:
        raise ValueError("x needs a unit stride on its last dim")
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out

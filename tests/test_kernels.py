"""Triton KV-cache kernels against naive torch references.

Device and dtype: whatever GPU is here (cuda:0), else the CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET); fp32 on both, with fp16 and bf16 in the half-precision test. Caches are block-major like the
engine's, so every per-layer view is strided, and block tables are shuffled so that logical and physical order differ.
"""
import pytest
import torch

from nanovllm.layers.kernels import paged_decode_attention, paged_prefill_attention, store_kvcache

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
TOL = dict(rtol=1e-4, atol=1e-5)
NUM_LAYERS, LAYER = 3, 1  # test a middle layer so both neighbours' data sit in the way


def make_cache(num_blocks, block_size, kv_heads, head_dim, dtype=DTYPE):
    """Random block-major cache and the (k, v) views one layer would get."""
    kv = torch.randn(num_blocks, NUM_LAYERS, 2, block_size, kv_heads, head_dim,
                     dtype=dtype, device=DEVICE)
    return kv, kv[:, LAYER, 0], kv[:, LAYER, 1]


def make_block_tables(context_lens, block_size, num_blocks):
    """Each sequence gets distinct, shuffled blocks; unused table entries are -1."""
    width = max(-(-n // block_size) for n in context_lens)
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    free = torch.randperm(num_blocks).tolist()
    for i, n in enumerate(context_lens):
        for j in range(-(-n // block_size)):
            tables[i, j] = free.pop()
    return tables.to(DEVICE)


def reference_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = []
    for b, n in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b].float(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out)


@pytest.mark.parametrize("kv_heads,head_dim", [(2, 16), (3, 32), (1, 64)])
def test_store_kvcache(kv_heads, head_dim):
    block_size, num_blocks, n = 16, 6, 7
    kv, k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    before = kv.clone()
    # key/value as strided views of a fused qkv projection, as the model produces them.
    qkv = torch.randn(n, 4 * kv_heads, head_dim, dtype=DTYPE, device=DEVICE)
    key, value = qkv[:, 2 * kv_heads: 3 * kv_heads], qkv[:, 3 * kv_heads:]
    slots = torch.randperm(num_blocks * block_size)[:n].to(torch.int32)
    slots[2] = slots[5] = -1
    store_kvcache(key, value, k_cache, v_cache, slots.to(DEVICE))

    expected = before.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[s // block_size, LAYER, 0, s % block_size] = key[i]
            expected[s // block_size, LAYER, 1, s % block_size] = value[i]
    assert torch.equal(kv, expected)  # written slots hold the data, all else is untouched


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 32), (6, 2, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention(block_size, q_heads, kv_heads, head_dim, num_splits):
    context_lens = [1, block_size, 37, 2 * block_size + 5]
    num_blocks = 12
    _, k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim)
    tables = make_block_tables(context_lens, block_size, num_blocks)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    # q as a strided view (a slice of the fused qkv output).
    q = torch.randn(len(context_lens), q_heads + 2 * kv_heads, head_dim,
                    dtype=DTYPE, device=DEVICE)[:, :q_heads]
    scale = head_dim ** -0.5

    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=num_splits)
    ref = reference_decode(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_attention_half_precision(dtype):
    block_size, kv_heads, head_dim, context_lens = 16, 2, 32, [5, 40]
    _, k_cache, v_cache = make_cache(6, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables(context_lens, block_size, 6)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, head_dim, dtype=dtype, device=DEVICE)

    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    ref = reference_decode(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_paged_decode_attention_default_splits_and_empty_row():
    """The heuristic split count on a GPU-like batch, and a zero-length padding row -> zeros."""
    block_size, kv_heads, head_dim = 16, 2, 16
    context_lens = [0, 50, 3]
    _, k_cache, v_cache = make_cache(8, block_size, kv_heads, head_dim)
    tables = make_block_tables(context_lens, block_size, 8)
    tables[0] = -1  # padding rows in a captured graph point nowhere
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, 2 * kv_heads, head_dim, dtype=DTYPE, device=DEVICE)

    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = reference_decode(q[1:], k_cache, v_cache, tables[1:], lens[1:], 0.25)
    torch.testing.assert_close(out[1:].float(), ref, **TOL)


def test_rejects_unsupported_block_size():
    _, k_cache, v_cache = make_cache(2, 24, 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        store_kvcache(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), k_cache, v_cache,
                      torch.zeros(1, dtype=torch.int32))


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention_in_cuda_graph(num_splits):
    """Captured with placeholder lengths, replayed with real ones: lengths are read on device."""
    block_size, context_lens = 16, [3, 40]
    _, k_cache, v_cache = make_cache(8, block_size, 2, 32)
    tables = make_block_tables(context_lens, block_size, 8)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 32, dtype=DTYPE, device=DEVICE)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2, num_splits)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2, num_splits)
    lens.copy_(torch.tensor(context_lens))
    graph.replay()
    ref = reference_decode(q, k_cache, v_cache, tables, lens, 0.2)
    torch.testing.assert_close(out.float(), ref, **TOL)


# ---- prompt attention over the paged cache ----

def reference_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale):
    """Each chunk's queries are its sequence's last tokens; query j sees keys 0..its own position."""
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        len_q = cu[b + 1] - cu[b]
        if len_q == 0:
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q[cu[b]:cu[b + 1]].float(), k) * scale
        visible = torch.ones(len_q, n, dtype=torch.bool, device=q.device).tril(n - len_q)
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqn,nhd->qhd", p, v)
    return out


def prefill_inputs(seq_lens, chunk_lens, block_size, q_heads, kv_heads, head_dim, dtype=DTYPE, num_blocks=24):
    _, k_cache, v_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = make_block_tables([max(n, 1) for n in seq_lens], block_size, num_blocks)
    cu = torch.tensor([0] + chunk_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    # q as a strided view (a slice of the fused qkv output), as the model passes it.
    q = torch.randn(sum(chunk_lens), q_heads + 2 * kv_heads, head_dim, dtype=dtype, device=DEVICE)[:, :q_heads]
    return q, k_cache, v_cache, tables, cu, lens


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 32), (6, 2, 64), (8, 2, 16)])
def test_paged_prefill_attention(block_size, q_heads, kv_heads, head_dim):
    """Whole prompts, chunks after a cached context (earlier chunks or a prefix hit), one-token chunks and a
    chunk spanning several query tiles, with tiles small enough that sequences share and straddle them."""
    seq_lens = [5, 40, 2 * block_size + 3, 1, 70]
    chunk_lens = [5, 17, 1, 1, 70]
    q, k_cache, v_cache, tables, cu, lens = prefill_inputs(seq_lens, chunk_lens, block_size, q_heads, kv_heads,
                                                           head_dim)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale, block_m=16, block_n=16)
    ref = reference_prefill(q, k_cache, v_cache, tables, cu, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOL)


def test_paged_prefill_attention_default_tiles_and_padding():
    """The default tile sizes; the runner's padding rows (a chunk of a length-0 sequence, block table -1: read
    nothing, give zeros) and empty chunks at the end (how a captured step would pad its sequence count)."""
    seq_lens, chunk_lens = [100, 33, 0, 0, 0], [60, 33, 7, 0, 0]
    q, k_cache, v_cache, tables, cu, lens = prefill_inputs(seq_lens, chunk_lens, 32, 8, 2, 32)
    tables[2:] = -1
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.2)
    ref = reference_prefill(q, k_cache, v_cache, tables, cu, lens, 0.2)
    torch.testing.assert_close(out.float(), ref, **TOL)
    assert torch.equal(out[93:], torch.zeros_like(out[93:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_prefill_attention_half_precision(dtype):
    q, k_cache, v_cache, tables, cu, lens = prefill_inputs([30, 50], [30, 20], 16, 4, 2, 32, dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 32 ** -0.5, block_m=16, block_n=16)
    ref = reference_prefill(q, k_cache, v_cache, tables, cu, lens, 32 ** -0.5)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_paged_prefill_attention_checks_its_inputs():
    q, k_cache, v_cache, tables, cu, lens = prefill_inputs([8], [8], 16, 4, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k_cache, v_cache, tables, cu[:1], lens, 0.25)
    with pytest.raises(ValueError, match="block_n"):
        paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.25, block_n=32)


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_paged_prefill_attention_in_cuda_graph():
    """Captured with one set of chunk lengths, replayed with others of the same token and sequence counts."""
    q, k_cache, v_cache, tables, cu, lens = prefill_inputs([40, 10], [30, 10], 16, 4, 2, 32)
    paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.2)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, 0.2)
    cu.copy_(torch.tensor([0, 35, 40]))  # within each sequence's block table (3 blocks and 1 of 16 tokens)
    lens.copy_(torch.tensor([38, 5]))
    graph.replay()
    ref = reference_prefill(q, k_cache, v_cache, tables, cu, lens, 0.2)
    torch.testing.assert_close(out.float(), ref, **TOL)


# ---- fused elementwise layers, against the torch functions the CPU path runs ----

def test_rms_norm_with_and_without_residual():
    from nanovllm.layers import kernels
    from nanovllm.layers.norm import add_rms_norm, rms_norm
    x = torch.randn(5, 96, dtype=DTYPE, device=DEVICE)
    residual, weight = torch.randn_like(x), torch.randn(96, dtype=DTYPE, device=DEVICE)
    normed, none = kernels.rms_norm(x, weight, 1e-6)
    assert none is None
    torch.testing.assert_close(normed, rms_norm(x, weight, 1e-6), **TOL)
    normed, summed = kernels.rms_norm(x, weight, 1e-6, residual)
    expected, expected_sum = add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(normed, expected, **TOL)
    assert torch.equal(summed, expected_sum)
    assert kernels.rms_norm(x[:0], weight, 1e-6)[0].shape == (0, 96)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_rotate_qk_per_head_on_strided_views(qk_norm):
    from nanovllm.layers import kernels
    from nanovllm.layers.norm import rms_norm
    from nanovllm.layers.rotary import RotaryEmbedding, apply_rotary
    tokens, q_heads, kv_heads, dim = 6, 4, 2, 32
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, dtype=DTYPE, device=DEVICE)
    q = qkv[:, :q_heads * dim].view(tokens, q_heads, dim)  # views of the fused projection, as in the model
    k = qkv[:, q_heads * dim:(q_heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    rope = RotaryEmbedding(dim, 64, {"rope_theta": 10000.0}).to(DEVICE)
    cos, sin = rope(torch.tensor([0, 5, 9, 17, 40, 63], device=DEVICE))
    q_weight, k_weight = (torch.randn(dim, dtype=DTYPE, device=DEVICE) for _ in range(2)) if qk_norm else (None, None)
    expected_q, expected_k = apply_rotary(rms_norm(q, q_weight, 1e-6) if qk_norm else q,
                                          rms_norm(k, k_weight, 1e-6) if qk_norm else k, cos, sin)
    out_q, out_k = kernels.rotate_qk(q, k, q_weight, k_weight, 1e-6, cos, sin)
    torch.testing.assert_close(out_q, expected_q, **TOL)
    torch.testing.assert_close(out_k, expected_k, **TOL)


def test_rotate_qk_also_stores_k_and_v_as_store_kvcache_does():
    """With the caches, the rotary kernel writes the rotated k and v where store_kvcache would, skipping slot -1,
    and leaves every other cache row alone."""
    from nanovllm.layers import kernels
    tokens, q_heads, kv_heads, dim, block_size = 5, 4, 2, 32, 16
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, dtype=DTYPE, device=DEVICE)
    q, k, v = qkv.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, k, v = q.view(tokens, q_heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    cos, sin = (torch.randn(tokens, dim, dtype=DTYPE, device=DEVICE) for _ in range(2))
    weight = torch.randn(dim, dtype=DTYPE, device=DEVICE)
    slots = torch.tensor([37, 2, -1, 63, 16], dtype=torch.int32, device=DEVICE)
    kv, k_cache, v_cache = make_cache(6, block_size, kv_heads, dim)
    expected = kv.clone()
    out_q, out_k = kernels.rotate_qk(q, k, weight, weight, 1e-6, cos, sin, v, k_cache, v_cache, slots)
    store_kvcache(out_k, v.contiguous(), expected[:, LAYER, 0], expected[:, LAYER, 1], slots)
    assert torch.equal(kv, expected)
    alone_q, alone_k = kernels.rotate_qk(q, k, weight, weight, 1e-6, cos, sin)
    assert torch.equal(out_q, alone_q) and torch.equal(out_k, alone_k)


def test_silu_and_mul():
    from nanovllm.layers import kernels
    x = torch.randn(4, 2 * 1500, dtype=DTYPE, device=DEVICE)  # more than one program per row
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(x), torch.nn.functional.silu(gate) * up, **TOL)

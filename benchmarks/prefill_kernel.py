"""Prompt attention on one GPU: the paged Triton kernel (`paged_prefill_attention`) against `varlen_attn` (flash,
in PyTorch) on the same inputs, the way the engine calls each: varlen on dense K/V, after gathering a chunk's
cached context out of the paged cache (`k_cache[prefix_rows]`) when it has one; the kernel reads the cache in place.

    python benchmarks/prefill_kernel.py            # Qwen3-0.6B's and Qwen3-8B's attention shapes, bf16, cuda:0

Per case: the GPU time of one call (CUDA events, median of 20 after warm-up; the gather included for varlen where
there is context), the host time to launch one call (GPU busy, so no launch waits), TFLOP/s of the causal
attention (the work a dense causal kernel must do), and the kernel's output against varlen's (max abs difference).
Then a sweep of the kernel's tile sizes and warps on the largest case. Not a test: nothing is asserted.
"""
import statistics
import time

import torch

from nanovllm.layers.attention import _varlen_attn
from nanovllm.layers.kernels import paged_prefill_attention

DEV, DTYPE, BLOCK = torch.device("cuda:0"), torch.bfloat16, 256
SHAPES = {"qwen3-0.6b": (16, 8, 128), "qwen3-8b": (32, 8, 128)}  # q heads, kv heads, head dim
# (name, [(context already cached, chunk)] per sequence)
CASES = [
    ("16 prompts of 1,024", [(0, 1024)] * 16),
    ("64 prompts of 100-1,024", [(0, 100 + (i * 367) % 925) for i in range(64)]),
    ("4 prompts of 3,072", [(0, 3072)] * 4),
    ("2,048-token chunk after 6,144", [(6144, 2048)]),
    ("8 chunks of 512 after 1,536", [(1536, 512)] * 8),
]


def inputs(case, q_heads, kv_heads, dim):
    lens = [c + n for c, n in case]
    blocks = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks) + 1, device=DEV)
    kv = torch.randn(sum(blocks) + 1, 2, BLOCK, kv_heads, dim, dtype=DTYPE, device=DEV)  # one layer's cache
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    tables = torch.full((len(case), max(blocks)), -1, dtype=torch.int32, device=DEV)
    rows, first = [], 0
    for i, b in enumerate(blocks):
        tables[i, :b] = perm[first:first + b].int()
        first += b
        pos = torch.arange(lens[i], device=DEV)
        rows.append(torch.stack([tables[i, (pos // BLOCK)].long(), pos % BLOCK]))
    chunks = [n for _, n in case]
    cu_q = torch.tensor([0] + chunks, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + lens, device=DEV).cumsum(0).int()
    q = torch.randn(sum(chunks), q_heads, dim, dtype=DTYPE, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    prefix_rows = tuple(torch.cat(rows, dim=1))
    return q, k_cache, v_cache, tables, cu_q, cu_k, seq_lens, prefix_rows, max(chunks), max(lens)


def timed(fn, reps=20):
    fn(); fn(); torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ms.append(a.elapsed_time(b))
    torch.cuda._sleep(100_000_000)  # keep the GPU busy: the launch below never waits for room
    t = time.perf_counter(); fn(); host_us = (time.perf_counter() - t) * 1e6
    torch.cuda.synchronize()
    return statistics.median(ms), host_us


def main():
    print(torch.cuda.get_device_name(DEV), torch.__version__)
    for model, (qh, kvh, dim) in SHAPES.items():
        print(f"\n{model}: {qh} q heads, {kvh} kv heads, head dim {dim}, cache blocks of {BLOCK}")
        print(f"{'case':<32} {'varlen ms':>9} {'kernel ms':>9} {'TFLOP/s v/k':>12} {'host us v/k':>12} {'max diff':>9}")
        for name, case in CASES:
            q, kc, vc, tables, cu_q, cu_k, seq_lens, rows, max_q, max_k = inputs(case, qh, kvh, dim)
            scale = dim ** -0.5
            has_context = any(c for c, _ in case)

            dense = (kc[rows], vc[rows])  # a whole prompt's K/V, as the model hands them to varlen

            def varlen():
                k, v = (kc[rows], vc[rows]) if has_context else dense  # a chunk with context gathers it first
                return _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0))

            def kernel():
                return paged_prefill_attention(q, kc, vc, tables, cu_q, seq_lens, scale)

            flop = sum(4 * qh * dim * (n * c + n * (n + 1) / 2) for c, n in case)
            (v_ms, v_host), (k_ms, k_host) = timed(varlen), timed(kernel)
            diff = (varlen().float() - kernel().float()).abs().max().item()
            print(f"{name:<32} {v_ms:9.3f} {k_ms:9.3f} {flop / v_ms / 1e9:5.0f}/{flop / k_ms / 1e9:<5.0f} "
                  f"{v_host:5.0f}/{k_host:<5.0f} {diff:9.4f}")
        name, case = CASES[0]
        q, kc, vc, tables, cu_q, cu_k, seq_lens, rows, _, _ = inputs(case, qh, kvh, dim)
        flop = sum(4 * qh * dim * (n * c + n * (n + 1) / 2) for c, n in case)
        print(f"sweep on '{name}': block_m, block_n, warps, stages -> ms (TFLOP/s)")
        for bm in (32, 64, 128):
            for bn in (32, 64, 128):
                for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                    try:
                        ms, _ = timed(lambda: paged_prefill_attention(q, kc, vc, tables, cu_q, seq_lens, dim ** -0.5,
                                                                      block_m=bm, block_n=bn, num_warps=warps,
                                                                      num_stages=stages), reps=5)
                        print(f"  {bm:4d} {bn:4d} {warps} {stages}: {ms:.3f} ({flop / ms / 1e9:.0f})")
                    except Exception as e:  # out of shared memory, say
                        print(f"  {bm:4d} {bn:4d} {warps} {stages}: {type(e).__name__}")


if __name__ == "__main__":
    main()

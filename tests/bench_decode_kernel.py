"""Benchmark paged_decode_attention against HBM bandwidth (run by hand on a GPU).

    python tests/bench_decode_kernel.py [--batch 1 8 32 256] [--ctx 512 1024 2048 4096] [--block-size 256] [--sweep]
    python tests/bench_decode_kernel.py --batch 64 128 256 --ctx 1024 --spread 0.1 2.0 [--longest-first]
    python tests/bench_decode_kernel.py --check-only --tiny     # CPU, Triton interpreter

Shape: Qwen3-0.6B (16 q heads, 8 kv heads, head_dim 128), bf16, a 28-layer block-major cache
of which one layer's strided view is timed, shuffled block tables, context lengths uniform in
[0.75, 1.25] x --ctx (--spread sets the range: the engine's batches mix lengths far more), in
random order or, with --longest-first, sorted as the scheduler orders a decode batch. Every run
first checks the kernel against the torch reference, including a CUDA-graph capture and replay on
a GPU, so the timings never describe a wrong kernel.

Columns: `us` is triton.testing.do_bench's median (L2 flushed before each call; includes the
host launch cost when the kernel is shorter than it); `graph us` is do_bench_cudagraph's,
replaying the call inside a CUDA graph as the engine does (no L2 flush, so batch 1's few MB
of KV may sit in L2). `% copy` compares KV bytes read per second with a 1 GiB
device-to-device copy's (bytes read + written) / time. --sweep adds, per batch, the fastest
block_n / num_warps / num_stages / split counts, graph-timed.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parent)]

import triton.testing  # noqa: E402

from nanovllm.layers.kernels import _decode, _default_block_n, _pick_num_splits  # noqa: E402
from test_kernels import reference_decode  # noqa: E402

QWEN3 = dict(q_heads=16, kv_heads=8, head_dim=128, layers=28)
TINY = dict(q_heads=6, kv_heads=2, head_dim=32, layers=3)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 256])
    p.add_argument("--ctx", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="mean context lengths")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--check-only", action="store_true", help="correctness check, no timing")
    p.add_argument("--tiny", action="store_true", help="tiny model shape, block size 16")
    p.add_argument("--sweep", action="store_true", help="also time block_n/warps/stages/splits")
    p.add_argument("--spread", type=float, nargs=2, default=[0.75, 1.25], metavar=("LO", "HI"),
                   help="context lengths uniform in [LO, HI] x ctx")
    p.add_argument("--longest-first", action="store_true", help="rows sorted by context length, longest first")
    return p.parse_args()


def make_case(shape, batch, ctx, block_size, dtype, device, pool_blocks=None, spread=(0.75, 1.25),
              longest_first=False):
    """Cache views, shuffled block tables, context lengths and q for one batch."""
    lo, hi = max(1, int(ctx * spread[0])), max(1, int(ctx * spread[1]))
    lens = torch.randint(lo, hi + 1, (batch,), dtype=torch.int32)
    if longest_first:
        lens = lens.sort(descending=True).values
    width = -(-hi // block_size)
    need = batch * width
    blocks = pool_blocks or need
    kv = torch.randn(blocks, shape["layers"], 2, block_size, shape["kv_heads"],
                     shape["head_dim"], dtype=dtype, device=device)
    if blocks >= need:
        ids = torch.randperm(blocks)[:need]
    else:  # cache too big for the device: reuse blocks, still in shuffled order
        ids = torch.randint(0, blocks, (need,))
    tables = ids.view(batch, width).to(torch.int32)
    q = torch.randn(batch, shape["q_heads"], shape["head_dim"], dtype=dtype, device=device)
    layer = shape["layers"] // 2
    return q, kv[:, layer, 0], kv[:, layer, 1], tables.to(device), lens.to(device)


def check(shape, block_size, dtype, device):
    """Kernel vs torch reference on short and block-boundary lengths, all split paths."""
    torch.manual_seed(0)
    q, k, v, tables, lens = make_case(shape, 4, 3 * block_size, block_size, dtype, device)
    lens.copy_(torch.tensor([1, block_size, block_size + 3, 2 * block_size + 17]))
    scale = shape["head_dim"] ** -0.5
    ref = reference_decode(q, k, v, tables, lens, scale)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    for splits in (None, 1, 3):
        out = _decode(q, k, v, tables, lens, scale, num_splits=splits)
        torch.testing.assert_close(out.float(), ref, **tol, msg=lambda m: f"splits={splits}: {m}")
    if device == "cuda":
        check_graph(q, k, v, tables, lens, scale, ref, tol)
    print(f"correctness OK ({device}, {dtype}, block_size {block_size})")


def check_graph(q, k, v, tables, lens, scale, ref, tol):
    """Capture with one set of lengths, replay with the real ones: no host-side data use."""
    real = lens.clone()
    lens.fill_(1)
    for splits in (1, 3):
        _decode(q, k, v, tables, lens, scale, num_splits=splits)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _decode(q, k, v, tables, lens, scale, num_splits=splits)
        lens.copy_(real)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref, **tol)
        lens.fill_(1)
    lens.copy_(real)


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    del a, b
    torch.cuda.empty_cache()  # so that pool_size sees the memory as free
    return 2 * (1 << 30) / (ms * 1e-3)


def pool_size(shape, batch, ctx, block_size, hi=1.25):
    """Blocks for the largest batch, or as many as fit in ~60% of free memory."""
    block_bytes = shape["layers"] * 2 * block_size * shape["kv_heads"] * shape["head_dim"] * 2
    need = batch * -(-int(ctx * hi) // block_size)
    fit = int(torch.cuda.mem_get_info()[0] * 0.6) // block_bytes
    if fit < need:
        print(f"note: {need} blocks do not fit; sampling block ids from a pool of {fit}")
    return min(need, fit)


def bench(args, shape, copy_bw):
    for ctx in args.ctx:
        bench_ctx(args, shape, copy_bw, sorted(set(args.batch)), ctx)


def bench_ctx(args, shape, copy_bw, batches, ctx):
    blocks = pool_size(shape, max(batches), ctx, args.block_size, args.spread[1])
    order = "longest first" if args.longest_first else "random order"
    print(f"\nd2d copy: {copy_bw / 1e9:.0f} GB/s   ctx in [{args.spread[0]}, {args.spread[1]}] x {ctx}, {order}, "
          f"block_size {args.block_size}")
    print(f"{'batch':>6} {'splits':>6} {'KV MB':>8} {'us':>8} {'GB/s':>6} {'% copy':>6}   "
          f"{'graph us':>8} {'GB/s':>6} {'% copy':>6}")
    for batch in batches:
        torch.manual_seed(batch)
        q, k, v, tables, lens = make_case(shape, batch, ctx, args.block_size, torch.bfloat16, "cuda", blocks,
                                          args.spread, args.longest_first)
        kv_bytes = int(lens.sum()) * shape["kv_heads"] * shape["head_dim"] * 2 * 2
        block_n = _default_block_n(args.block_size, shape["head_dim"])
        splits = _pick_num_splits(None, batch * shape["kv_heads"],
                                  tables.shape[1] * args.block_size // block_n, q.device)
        fn = lambda: _decode(q, k, v, tables, lens, shape["head_dim"] ** -0.5)  # noqa: E731
        cols = []
        for timer in (triton.testing.do_bench, triton.testing.do_bench_cudagraph):
            us = timer(fn, return_mode="median") * 1e3
            bw = kv_bytes / (us * 1e-6)
            cols.append(f"{us:>8.1f} {bw / 1e9:>6.0f} {100 * bw / copy_bw:>5.0f}%")
        print(f"{batch:>6} {splits:>6} {kv_bytes / 1e6:>8.1f} " + "   ".join(cols))
        if args.sweep:
            sweep(q, k, v, tables, lens, shape, kv_bytes, copy_bw)
        del q, k, v, tables, lens
        torch.cuda.empty_cache()


def sweep(q, k, v, tables, lens, shape, kv_bytes, copy_bw):
    """Graph-timed launch configs for one batch: tile/warps/stages at the default split
    count, then split counts at the best of those. Prints the best few."""
    def run(block_n, warps, stages, splits=None):
        fn = lambda: _decode(q, k, v, tables, lens, shape["head_dim"] ** -0.5,  # noqa: E731
                             splits, block_n, warps, stages)
        try:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3
        except Exception as e:  # e.g. out of shared memory
            print(f"   block_n {block_n} warps {warps} stages {stages}: {e!r:.100}")
            return float("inf")

    configs = [(n, w, s) for n in (16, 32, 64, 128) if n <= k.shape[1] for w in (4, 8)
               for s in (2, 3, 4)]
    results = sorted(((run(*c), *c, None) for c in configs), key=lambda r: r[0])
    best = results[0][1:4]
    results += [(run(*best, splits), *best, splits) for splits in (1, 2, 4, 8, 16, 32)]
    for us, block_n, warps, stages, splits in sorted(results, key=lambda r: r[0])[:6]:
        pct = 100 * kv_bytes / (us * 1e-6) / copy_bw
        print(f"   {us:8.1f} us {pct:4.0f}%  block_n {block_n} warps {warps} stages {stages} "
              f"splits {splits or 'auto'}")


def main():
    args = parse_args()
    gpu = torch.cuda.is_available()
    shape, block_size = (TINY, 16) if args.tiny else (QWEN3, args.block_size)
    dtype = torch.bfloat16 if gpu else torch.float32
    check(shape, block_size, dtype, "cuda" if gpu else "cpu")
    if args.check_only or not gpu:
        return
    if args.tiny:
        sys.exit("--tiny is for --check-only")
    bench(args, shape, copy_bandwidth())


if __name__ == "__main__":
    main()

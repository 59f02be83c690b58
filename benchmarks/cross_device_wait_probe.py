"""Does work on the decode GPU block the host while one of its streams waits for the prefill GPU?

Session 29-30: static PD on the Qwen3-8B shape at 18 req/s held the host inside one launch on GPU1 for 175-485 ms
once per run, with GPU0's prompt steps up to 16,384 tokens (~0.4 s); with 1,024- or 2,048-token steps, GPU1's
longest launch was 52-102 ms. A KV copy starts as soon as a sequence is placed, while GPU0 still computes its
first token, and torch's cross-device `copy_` makes the destination's current stream (GPU1's copy stream) wait for
the copy, so GPU1 then holds a stream that waits for GPU0's step. Any call that synchronizes GPU1 as a whole
(cudaMalloc or cudaFree may, cudaDeviceSynchronize does) would wait for that step. The pinned-memory pool is not it
(`pinned_pool_probe.py`, session 30).

Queues ~1 s of spinning on cuda:0, a small peer copy cuda:0 -> cuda:1 behind it the way kv_transfer.py does it, and
then times on the host, for cuda:1: a graph-free kernel launch, a small tensor from the allocator's cache, a new
1 GiB tensor (a fresh cudaMalloc), `torch.cuda.empty_cache()` (cudaFree), a pinned host-to-device copy, and waiting for
cuda:1's compute stream (what reading a step's tokens does); first with cuda:0 idle.

    python benchmarks/cross_device_wait_probe.py      # two GPUs, ~5 s
"""
import time

import torch


def timed(label: str, fn):
    t = time.perf_counter()
    fn()
    return f"{label} {1e3 * (time.perf_counter() - t):7.2f} ms"


def probe(src: torch.device, dst: torch.device, spin: bool) -> list[str]:
    a, b = torch.zeros(1 << 20, device=src), torch.zeros(1 << 20, device=dst)
    copy_src, copy_dst = torch.cuda.Stream(src), torch.cuda.Stream(dst)
    torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
    if spin:
        with torch.cuda.device(src):
            torch.cuda._sleep(2_000_000_000)  # ~1 s on an H100/H200 clock, on src's current stream
    copy_src.wait_stream(torch.cuda.current_stream(src))  # as the engine's copy waits for the step writing the KV
    with torch.cuda.device(src), torch.cuda.stream(copy_src), torch.cuda.stream(copy_dst):
        b.copy_(a, non_blocking=True)  # torch: copy_dst now waits for the copy, which waits for the spin
    data = torch.arange(1000).pin_memory()
    with torch.cuda.device(dst):
        rows = [timed("launch", lambda: b.add_(1)),
                timed("cached alloc", lambda: torch.empty(1000, device=dst)),
                timed("new 1 GiB alloc", lambda: torch.empty(1 << 28, device=dst)),
                timed("empty_cache", torch.cuda.empty_cache),
                timed("pinned H2D", lambda: data.to(dst, non_blocking=True)),
                timed("sync compute stream", torch.cuda.current_stream(dst).synchronize)]
    t = time.perf_counter()
    torch.cuda.synchronize(src)
    rows.append(f"then cuda:0 done after {1e3 * (time.perf_counter() - t):.0f} ms")
    return rows


def main():
    src, dst = torch.device("cuda:0"), torch.device("cuda:1")
    print(f"{torch.cuda.get_device_name(src)} x{torch.cuda.device_count()}; host time of each call on {dst}")
    probe(src, dst, spin=False)  # warm-up: peer access, events, allocator
    for spin in (False, True):
        print(f"  cuda:0 {'busy (~1 s spin, a copy to cuda:1 behind it)' if spin else 'idle'}:")
        print("    " + "; ".join(probe(src, dst, spin)))


if __name__ == "__main__":
    main()

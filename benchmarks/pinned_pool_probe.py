"""Does torch's pinned-memory pool hold one GPU's host-to-device copies while a copy to another GPU waits behind a
long kernel? Session 29 saw static PD on the Qwen3-8B shape stall the host for 0.3-0.5 s once per run at 18 req/s.
Every step's inputs go through `pin_memory()`; the pool (torch 2.11's CachingHostAllocatorImpl) reuses a freed
block only once its copy's event is done, checking events oldest first across all devices and stopping at the
first not done. So a copy queued behind GPU0's long prompt step would keep every block GPU1's steps free from
coming back, and each new one is a cudaHostAlloc: the question is how long those take while GPU0 is busy.

Prints, for bursts of small copies to the last GPU: the host time of the burst and of its slowest copy, and how many
new pinned blocks it allocated, with the first GPU idle and then with a copy to it queued behind ~1 s of spinning.
With one GPU, both sides are cuda:0.

    python benchmarks/pinned_pool_probe.py      # ~10 s
"""
import time

import torch


def burst(data: torch.Tensor, device: torch.device, copies: int) -> str:
    stats = torch.cuda.host_memory_stats()
    start, slowest = time.perf_counter(), 0.0
    for _ in range(copies):
        t = time.perf_counter()
        data.pin_memory().to(device, non_blocking=True)
        slowest = max(slowest, time.perf_counter() - t)
    total = time.perf_counter() - start
    new = torch.cuda.host_memory_stats()["num_host_alloc"] - stats["num_host_alloc"]
    return f"{copies} copies in {1e3 * total:7.1f} ms, slowest {1e3 * slowest:7.2f} ms, {new} new pinned blocks"


def main():
    first, last = torch.device("cuda:0"), torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    data = torch.arange(1000)  # 8 KB, like a step's token ids
    print(f"{torch.cuda.get_device_name(first)}; copies to {last}, the spin and the held copy on {first}")
    burst(data, last, 200)  # the pool's first blocks
    torch.cuda.synchronize(last)
    print(f"  {first} idle:                  {burst(data, last, 200)}")
    torch.cuda.synchronize(last)
    with torch.cuda.device(first):
        torch.cuda._sleep(2_000_000_000)  # ~1 s on an H100/H200 clock
        data.pin_memory().to(first, non_blocking=True)  # freed now; its event waits for the spin
    print(f"  {first} busy (~1 s spin ahead): {burst(data, last, 200)}")
    t = time.perf_counter()
    torch.cuda.synchronize(first)
    print(f"  the spin ended {1e3 * (time.perf_counter() - t):.0f} ms after the burst")


if __name__ == "__main__":
    main()

"""How many kernel launches can queue behind a long-running one before the host blocks in a launch?
Session 27 saw adaptive PD's add_delay p99 at 281 ms on the Qwen3-8B shape at 18 req/s (the engine loop held
that long): a guess is that launching GPU0's next prompt step (~500+ kernels) behind a ~300 ms prompt step fills
the launch queue, and the host then waits inside a launch for the GPU. Prints, per count, the host ms to launch
that many small kernels behind a ~300 ms matmul burst, and the same with the GPU idle.

    python benchmarks/launch_queue_probe.py      # cuda:0; ~15 s (session 28 on an H200: BENCHMARKS.md)"""
import time
import torch

dev = torch.device("cuda:0")
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
x = torch.zeros(16, device=dev)


def burst(ms: float):
    """Queue roughly `ms` of matmuls (calibrated below)."""
    for _ in range(int(ms / per_matmul_ms)):
        torch.mm(a, a)


torch.mm(a, a); torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    torch.mm(a, a)
torch.cuda.synchronize()
per_matmul_ms = (time.perf_counter() - t) * 1000 / 20
print(f"{torch.cuda.get_device_name(dev)}: one 8192^3 bf16 matmul {per_matmul_ms:.2f} ms")
for n in (250, 500, 1000, 1500, 2000, 3000, 4000, 8000):
    row = []
    for busy in (False, True):
        torch.cuda.synchronize()
        if busy:
            burst(300)
        t = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        row.append((time.perf_counter() - t) * 1000)
        torch.cuda.synchronize()
    print(f"{n:5d} small launches: host {row[0]:7.1f} ms with the GPU idle, {row[1]:7.1f} ms behind ~300 ms of matmuls")

"""Why a launcher thread per GPU slowed the prompt launches (session 24): a toy of the GIL's share-out.

One thread runs a ~30 ms burst of small torch ops (like a prompt step's launches: host-bound, GIL held);
another, beside it, spends ~1.2 ms on small ops every ~5 ms (like the decode GPU's launches). Prints the
burst's median time alone and beside the other thread, at Python's default GIL switch interval (5 ms) and
at 0.5 ms. CPU only; no GPU needed.   python benchmarks/gil_contention.py
"""
import sys
import threading
import time

import torch

x = torch.zeros(16)


def small_ops(n: int):
    for _ in range(n):
        x.add_(1.0)


def per_op_s() -> float:
    start = time.perf_counter()
    small_ops(20000)
    return (time.perf_counter() - start) / 20000


def burst_ms(burst: int, beside: int | None, interval_s: float) -> float:
    """Median time of the burst, alone (beside=None) or beside a thread running `beside` ops every ~4 ms."""
    sys.setswitchinterval(interval_s)
    stop = threading.Event()

    def launcher():
        while not stop.is_set():
            small_ops(beside)
            time.sleep(0.004)  # its step runs on the device

    other = threading.Thread(target=launcher) if beside else None
    if other:
        other.start()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        small_ops(burst)
        times.append(time.perf_counter() - start)
        time.sleep(0.003)
    stop.set()
    if other:
        other.join()
    return sorted(times)[len(times) // 2] * 1e3


if __name__ == "__main__":
    per = per_op_s()
    burst, beside = int(0.030 / per), int(0.0012 / per)
    for interval in (0.005, 0.0005):
        print(f"switch interval {interval * 1e3:.1f} ms: burst alone {burst_ms(burst, None, interval):.1f} ms, "
              f"beside the other thread {burst_ms(burst, beside, interval):.1f} ms")

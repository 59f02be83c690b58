"""A toy queue model of TTFT on the Qwen3-8B online shape: what the prompt side of each two-GPU setup can give.

Not a measurement: a model fitted to one. Prompt tokens cost PROMPT_S each (26.8 us: static PD's GPU0 was 0.733 busy
for 14.2 s computing 388,629 prompt tokens at 18 req/s on an H200, session 29), a step STEP_S more; a decode step
takes DECODE_S. Poisson arrivals, prompts uniform in [1,024, 3,072] tokens (bench.py's workload), FCFS. TTFT ends
with the step that computes a prompt's last token. Decodes are ignored except as the step a helping GPU's chunks
ride on.

- static PD: GPU0 takes waiting prompt tokens up to a step budget;
- static PD with help: also GPU1, while more than a step's worth waits beyond the head, takes the next prompt and
  computes it in chunks beside its decodes (its gaps then last DECODE_S + chunk * PROMPT_S);
- dp: two engines, requests alternating, each step a decode plus up to a chunk of prompt tokens.

It put session 29's static PD at TTFT p50 / p99 71 / 174, 107 / 373, 370 / 1,052 ms at 6 / 12 / 18 req/s (measured:
72-76 / 153-157, 96-104 / 364-398, 182-323 / 565-945) and dp with whole-prompt chunks near its measured p99s.

    python benchmarks/ttft_queue_model.py
"""
import random

PROMPT_S, STEP_S, DECODE_S = 26.8e-6, 0.003, 0.008


def arrivals(rate: float, n: int, seed: int = 0) -> list[list[float]]:
    rnd, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rnd.expovariate(rate)
        out.append([t, rnd.randint(1024, 3072)])  # [arrival, prompt tokens left]
    return out


def percentiles(ttft: list[float]) -> tuple[float, float]:
    ttft = sorted(ttft)
    return 1000 * ttft[len(ttft) // 2], 1000 * ttft[int(0.99 * len(ttft)) - 1]


def take(waiting: list[list[float]], budget: int) -> tuple[int, list]:
    """FCFS: tokens from the waiting prompts up to `budget`; returns the tokens taken and the prompts completed."""
    left, done = budget, []
    for prompt in waiting:
        if left <= 0:
            break
        tokens = min(left, prompt[1])
        prompt[1] -= tokens
        left -= tokens
        if prompt[1] == 0:
            done.append(prompt)
    waiting[:] = [p for p in waiting if p[1] > 0]
    return budget - left, done


def static_pd(rate: float, budget: int = 16384, help_chunk: int = 0, n: int = 200) -> tuple:
    """TTFT p50, p99 (ms) and the share of GPU1's steps that carry a chunk (0 without help)."""
    queue, waiting, ttft = arrivals(rate, n), [], []
    gpu0_free = gpu1_free = 0.0
    helped, gpu1_steps, gpu1_chunks = None, 0, 0
    now = 0.0
    while queue or waiting or helped:
        while queue and queue[0][0] <= now:
            waiting.append(queue.pop(0))
        if gpu0_free <= now and waiting:
            tokens, done = take(waiting, budget)
            gpu0_free = now + STEP_S + PROMPT_S * tokens
            ttft += [gpu0_free - p[0] for p in done]
        if help_chunk and gpu1_free <= now:
            beyond_head = sum(p[1] for p in waiting[1:])
            if helped is None and beyond_head > budget:
                helped = waiting.pop(1)
            tokens = min(help_chunk, helped[1]) if helped else 0
            gpu1_free = now + DECODE_S + PROMPT_S * tokens
            gpu1_steps, gpu1_chunks = gpu1_steps + 1, gpu1_chunks + bool(tokens)
            if helped:
                helped[1] -= tokens
                if helped[1] == 0:
                    ttft.append(gpu1_free - helped[0])
                    helped = None
        events = [t for t in (gpu0_free, gpu1_free if help_chunk else None) if t is not None and t > now]
        now = min(events + ([queue[0][0]] if queue else [])) if events or queue else now
    return (*percentiles(ttft), gpu1_chunks / max(gpu1_steps, 1))


def dp(rate: float, chunk: int, n: int = 200) -> tuple:
    """TTFT p50, p99 (ms) of two engines, each with half the requests, each step a decode and a chunk."""
    ttft = []
    for engine in range(2):
        queue, waiting, now = arrivals(rate, n)[engine::2], [], 0.0
        while queue or waiting:
            while queue and queue[0][0] <= now:
                waiting.append(queue.pop(0))
            if not waiting:
                now = queue[0][0]
                continue
            tokens, done = take(waiting, chunk)
            now += DECODE_S + PROMPT_S * tokens
            ttft += [now - p[0] for p in done]
    return percentiles(ttft)


def main():
    for rate in (6, 12, 18):
        print(f"--- {rate} req/s: TTFT p50 / p99 ms")
        print("  static PD, 16,384-token steps   %5.0f / %5.0f" % static_pd(rate)[:2])
        print("  static PD, 2,048-token steps    %5.0f / %5.0f" % static_pd(rate, budget=2048)[:2])
        for budget, chunk in ((2048, 512), (2048, 1024)):
            p50, p99, share = static_pd(rate, budget, help_chunk=chunk)
            print(f"  static PD, {budget:,} steps, GPU1 helps in {chunk}-token chunks: {p50:5.0f} / {p99:5.0f}; "
                  f"{share:.0%} of GPU1's steps carry a chunk (~{1000 * (DECODE_S + PROMPT_S * chunk):.0f} ms each)")
        for chunk in (512, 1024, 16384):
            print(f"  dp, {chunk}-token chunks              %5.0f / %5.0f" % dp(rate, chunk))


if __name__ == "__main__":
    main()
